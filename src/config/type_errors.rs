//! Names the key of a value that failed to deserialize, such as a string
//! where a number belongs.
//!
//! The `config` crate names the key for `[state]`, `[poll]`, `[service]` and
//! `[[tenant]]`. A `[[sink]]` entry is read through serde's internally tagged
//! enum and flattened structs, which buffer the values and lose the key, so
//! the crate reports only `sink[1]`. For such an error the entry is read
//! again, part by part, from a `toml::Value` with the path tracked. That
//! value is as strict as serde's buffer (neither turns the number 5 into
//! the string "5"), so the second read fails where the first did.

use config::ValueKind;
use serde::de::DeserializeOwned;
use toml::Value as Toml;

use super::{
    tidy_path, ConfigError, FileSinkConfig, HttpSinkConfig, SinkCommon, SinkProxyConfig, SplunkHecSinkConfig,
    StdoutSinkConfig, SyslogSinkConfig, TlsConfig,
};

/// Converts an error of `try_deserialize` into one that names the full key
/// and, when `overrides` set that key, the environment variable.
/// `overrides` pairs each overridden key with its variable.
pub(super) fn keyed_error(merged: &config::Config, error: config::ConfigError, overrides: &[(String, String)]) -> ConfigError {
    let Some(key) = error_key(&error) else {
        return ConfigError::Parse(error);
    };
    let located = sink_index(&key).and_then(|index| locate_in_sink(merged, index));
    let (key, message) = located.unwrap_or_else(|| (key, error_message(&error)));
    let message = if may_hold_secret(&key) { without_string_value(&message) } else { message };
    // An unknown field is reported on its section, so the field's full key
    // is what an override may have set.
    let unknown = message.strip_prefix("unknown field `").and_then(|rest| rest.split('`').next()).map(|field| format!("{key}.{field}"));
    let variable = overrides.iter().find(|(overridden, _)| key_within(&key, overridden) || unknown.as_deref() == Some(overridden.as_str()));
    let message = match variable {
        Some((_, variable)) => format!("{message} (set by the environment variable {variable})"),
        None => message,
    };
    ConfigError::Invalid { key, message }
}

/// True for a key whose value may be a secret: a token, a client secret, a
/// password, a header (`Authorization`) or a proxy URL with credentials.
pub(super) fn may_hold_secret(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["secret", "token", "password", "header", "proxy"].iter().any(|word| key.contains(word))
}

/// Replaces the value in serde's `string "..."`, `integer `...`` and
/// `floating point `...`` in `message`, so an error about a secret's type
/// does not print the secret.
fn without_string_value(message: &str) -> String {
    let message = without_number_value(message);
    without_quoted_string(&message)
}

/// Replaces the number in serde's "integer `42`" or "floating point `4.2`"
/// with the type's name alone.
pub(super) fn without_number_value(message: &str) -> String {
    let mut out = message.to_string();
    for kind in ["integer `", "floating point `"] {
        while let Some(start) = out.find(kind) {
            let value_start = start + kind.len();
            let Some(length) = out[value_start..].find('`') else { break };
            out.replace_range(start + kind.len() - 2..value_start + length + 1, "");
        }
    }
    out
}

fn without_quoted_string(message: &str) -> String {
    let Some(start) = message.find("string \"") else {
        return message.to_string();
    };
    let value_start = start + "string \"".len();
    // The value is written with Rust's escapes, so `\"` does not end it.
    let mut escaped = false;
    let end = message[value_start..].char_indices().find_map(|(i, c)| match (escaped, c) {
        (true, _) => {
            escaped = false;
            None
        }
        (false, '\\') => {
            escaped = true;
            None
        }
        (false, '"') => Some(value_start + i + 1),
        _ => None,
    });
    match end {
        Some(end) => format!("{}a string{}", &message[..start], &message[end..]),
        // A value cut off: nothing after it is kept.
        None => format!("{}a string", &message[..start]),
    }
}

fn error_key(error: &config::ConfigError) -> Option<String> {
    match error {
        config::ConfigError::Type { key: Some(key), .. } | config::ConfigError::At { key: Some(key), .. } => {
            Some(tidy_path(key))
        }
        _ => None,
    }
}

/// Returns the message without the key and origin that the `config`
/// crate appends, since the caller names the key itself.
fn error_message(error: &config::ConfigError) -> String {
    let message = match error {
        config::ConfigError::Type { unexpected, expected, .. } => format!("invalid type: {unexpected}, expected {expected}"),
        config::ConfigError::At { error, .. } => error.to_string(),
        other => other.to_string(),
    };
    with_enum_values(&message)
}

/// Replaces the `config` crate's "enum OutboxFullPolicy does not have
/// variant constructor X", which names a Rust type, with the values the
/// key takes.
fn with_enum_values(message: &str) -> String {
    const ENUMS: [(&str, &str); 2] = [("OutboxFullPolicy", "pause or drop_oldest"), ("LogFormat", "text or json")];
    for (name, values) in ENUMS {
        let prefix = format!("enum {name} does not have variant constructor ");
        if let Some(value) = message.strip_prefix(&prefix) {
            return format!("unknown value {value:?}: use {values}");
        }
        if message.starts_with(&format!("value of enum {name} ")) {
            return format!("not a string: use {values}, in quotes");
        }
    }
    message.to_string()
}

/// Returns N when `key` is exactly `sink[N]`.
fn sink_index(key: &str) -> Option<usize> {
    key.strip_prefix("sink[")?.strip_suffix(']')?.parse().ok()
}

/// True when `key` is `overridden` or lies inside it.
pub(super) fn key_within(key: &str, overridden: &str) -> bool {
    match key.strip_prefix(overridden) {
        Some(rest) => rest.is_empty() || rest.starts_with('.') || rest.starts_with('['),
        None => false,
    }
}

type Check = fn(&Toml) -> Option<serde_path_to_error::Error<toml::de::Error>>;

/// Reads `[[sink]]` number `index` again and returns the full key and the
/// message of its first error, or `None` when no part fails on its own.
fn locate_in_sink(merged: &config::Config, index: usize) -> Option<(String, String)> {
    let sinks = merged.get_array("sink").ok()?;
    let mut table = to_toml(sinks.get(index)?)?;
    let kind = table.as_table_mut()?.remove("type")?;

    // The flattened parts come first, because they ignore the keys of other
    // parts, while the sink's own struct loses the path inside its parts.
    // NOTE: a part newly flattened into a sink type must be listed here too,
    // or its errors name only `sink[N]`.
    let checks: &[Check] = match kind.as_str()? {
        "syslog" => &[first_error::<SinkCommon>, first_error::<TlsConfig>, first_error::<SyslogSinkConfig>],
        "file" => &[first_error::<SinkCommon>, first_error::<FileSinkConfig>],
        "stdout" => &[first_error::<SinkCommon>, first_error::<StdoutSinkConfig>],
        "http" => &[
            first_error::<SinkCommon>,
            first_error::<TlsConfig>,
            first_error::<SinkProxyConfig>,
            first_error::<HttpSinkConfig>,
        ],
        "splunk_hec" => &[
            first_error::<SinkCommon>,
            first_error::<TlsConfig>,
            first_error::<SinkProxyConfig>,
            first_error::<SplunkHecSinkConfig>,
        ],
        _ => return None,
    };

    let error = checks.iter().find_map(|check| check(&table))?;
    let path = error.path().to_string();
    let key = if path == "." { format!("sink[{index}]") } else { format!("sink[{index}].{path}") };
    // `message` leaves out the line that toml's Display adds to name the key.
    Some((key, error.into_inner().message().to_string()))
}

fn first_error<T: DeserializeOwned>(table: &Toml) -> Option<serde_path_to_error::Error<toml::de::Error>> {
    serde_path_to_error::deserialize::<_, T>(table.clone()).err()
}

/// Converts a value back to TOML, or `None` for an empty value, which TOML
/// cannot hold and no source of this config produces.
fn to_toml(value: &config::Value) -> Option<Toml> {
    let converted = match &value.kind {
        ValueKind::Nil => return None,
        ValueKind::Boolean(flag) => Toml::Boolean(*flag),
        ValueKind::I64(number) => Toml::Integer(*number),
        // TOML integers are 64-bit signed, and so are the numbers that
        // environment overrides produce. A larger one reads as a float,
        // which every integer key rejects.
        ValueKind::U64(number) => i64::try_from(*number).map_or(Toml::Float(*number as f64), Toml::Integer),
        ValueKind::I128(number) => i64::try_from(*number).map_or(Toml::Float(*number as f64), Toml::Integer),
        ValueKind::U128(number) => i64::try_from(*number).map_or(Toml::Float(*number as f64), Toml::Integer),
        ValueKind::Float(number) => Toml::Float(*number),
        ValueKind::String(text) => Toml::String(text.clone()),
        ValueKind::Table(table) => {
            Toml::Table(table.iter().filter_map(|(key, value)| Some((key.clone(), to_toml(value)?))).collect())
        }
        ValueKind::Array(items) => Toml::Array(items.iter().filter_map(to_toml).collect()),
    };
    Some(converted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_string_values_hidden() {
        let message = r#"invalid type: string "Authorization: Bearer s3\"cret", expected a map"#;
        assert_eq!(without_string_value(message), "invalid type: a string, expected a map");
        assert_eq!(without_string_value("invalid type: map, expected a string"), "invalid type: map, expected a string");
        assert_eq!(without_string_value("invalid type: integer `12345`, expected a string"), "invalid type: integer, expected a string");
        assert_eq!(without_string_value("invalid type: floating point `1.5`, expected a string"), "invalid type: floating point, expected a string");
        assert!(may_hold_secret("sink[0].headers"));
        assert!(may_hold_secret("tenant[1].client_secret"));
        assert!(!may_hold_secret("sink[0].max_datagram_bytes"));
    }
}

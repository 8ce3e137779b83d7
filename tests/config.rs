//! Config loading: unknown keys, environment overrides, validation messages.

use std::path::PathBuf;

use mde_forwarder::config::Config;

const BASE: &str = r#"
[state]
dir = "/tmp/mde-forwarder-test-state"

[[tenant]]
name = "contoso-eu"
tenant_id = "tid"
client_id = "cid"
client_secret = "from-file"
region = "eu"

[[sink]]
name = "siem"
type = "syslog"
address = "127.0.0.1:514"
"#;

fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, String> {
    let (_dir, path) = write(text);
    let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    Config::load_with_env(&path, &env).map_err(|e| e.to_string())
}

#[test]
fn base_config_loads_with_defaults() {
    let config = load(BASE, &[]).unwrap();
    assert_eq!(config.poll.interval_secs, 60);
    assert_eq!(config.poll.overlap_secs, 300);
    assert_eq!(config.poll.limit, 0);
    let tenants = config.resolve_tenants().unwrap();
    assert_eq!(tenants[0].alerts_url, "https://wdatp-alertexporter-eu.windows.com/api/alerts");
    assert_eq!(tenants[0].token_url, "https://login.microsoftonline.com/tid/oauth2/token");
}

#[test]
fn unknown_keys_are_named() {
    let cases = [
        (BASE.replace("[state]", "[state]\nmax_outbox = 1"), "max_outbox"),
        (BASE.to_string() + "\n[poll]\nintervl_secs = 5\n", "intervl_secs"),
        (BASE.replace("region = \"eu\"", "region = \"eu\"\nsecret = \"x\""), "secret"),
        (BASE.replace("type = \"syslog\"", "type = \"syslog\"\nprotocl = \"udp\""), "protocl"),
        (BASE.to_string() + "\n[servce]\nx = 1\n", "servce"),
    ];
    for (text, key) in cases {
        let err = load(&text, &[]).unwrap_err();
        assert!(err.contains(&format!("unknown field `{key}`")), "{key}: {err}");
    }
}

#[test]
fn environment_overrides_any_key() {
    let env = [
        ("MDE_FORWARDER__POLL__INTERVAL_SECS", "15"),
        ("MDE_FORWARDER__TENANT__CONTOSO_EU__CLIENT_SECRET", "from-env"),
        ("MDE_FORWARDER__SINK__0__ADDRESS", "127.0.0.1:6514"),
        ("MDE_FORWARDER__SINK__SIEM__BATCH_SIZE", "100"),
        ("MDE_FORWARDER__SINK__SIEM__CEF_VERSION", "2.0"),
        ("UNRELATED", "x"),
    ];
    let config = load(BASE, &env).unwrap();
    assert_eq!(config.poll.interval_secs, 15);
    assert_eq!(config.tenants[0].client_secret.as_ref().unwrap().expose(), "from-env");
    match &config.sinks[0] {
        mde_forwarder::config::SinkConfig::Syslog(s) => {
            assert_eq!(s.address, "127.0.0.1:6514");
            assert_eq!(s.common.batch_size, 100, "a flattened numeric key");
            assert_eq!(s.common.cef_version, "2.0", "a text key that looks like a number");
        }
        other => panic!("unexpected sink {other:?}"),
    }
}

#[test]
fn environment_override_of_missing_index_names_the_variable() {
    let err = load(BASE, &[("MDE_FORWARDER__SINK__5__ADDRESS", "127.0.0.1:1")]).unwrap_err();
    assert!(err.contains("MDE_FORWARDER__SINK__5__ADDRESS"), "{err}");
    assert!(err.contains("no [[sink]] number 5"), "{err}");
}

#[test]
fn environment_override_of_unknown_entry_is_an_error() {
    let err = load(BASE, &[("MDE_FORWARDER__TENANT__FABRIKAM__CLIENT_SECRET", "x")]).unwrap_err();
    assert!(err.contains("no [[tenant]] named \"fabrikam\""), "{err}");
    let err = load(BASE, &[("MDE_FORWARDER__POLL__INTERVL_SECS", "5")]).unwrap_err();
    assert!(err.contains("intervl_secs"), "{err}");
}

#[test]
fn invalid_values_name_key_and_fix() {
    let cases = [
        (BASE.replace("region = \"eu\"", "region = \"mars\""), "tenant[0].region"),
        (BASE.replace("client_secret = \"from-file\"", ""), "tenant[0].client_secret"),
        (BASE.replace("region = \"eu\"", "api_url = \"ftp://x\"\nlogin_url = \"https://l\""), "tenant[0].api_url"),
        (BASE.replace("address = \"127.0.0.1:514\"", "address = \"localhost\""), "sink[0].address"),
        (BASE.replace("name = \"siem\"", "name = \"bad name\""), "sink[0].name"),
        (BASE.to_string() + "\n[poll]\ninterval_secs = 0\n", "poll.interval_secs"),
        (BASE.replace("[state]", "[state]\ndedupe_retention_secs = 60"), "state.dedupe_retention_secs"),
        (BASE.replace("type = \"syslog\"", "type = \"syslog\"\nframing = \"none\""), "sink[0].framing"),
        (BASE.replace("type = \"syslog\"", "type = \"syslog\"\nprotocol = \"udp\"\nframing = \"octet-counting\""), "sink[0].framing"),
    ];
    for (text, key) in cases {
        let result = load(&text, &[]).and_then(|c| c.resolve_tenants().map(|_| ()).map_err(|e| e.to_string()));
        let err = result.unwrap_err();
        assert!(err.contains(key), "{key}: {err}");
    }
}

/// A second sink of type http, so that sink errors are checked at index 1.
const HTTP_SINK: &str = "\n[[sink]]\nname = \"collector\"\ntype = \"http\"\nurl = \"https://collector.example/ingest\"\n";

/// A value an environment override set that fails validation names the
/// variable, as a value of the wrong type does.
#[test]
fn range_errors_name_variable() {
    let err = load(BASE, &[("MDE_FORWARDER__POLL__INTERVAL_SECS", "0")]).unwrap_err();
    assert!(err.contains("poll.interval_secs"), "{err}");
    assert!(err.contains("(set by the environment variable MDE_FORWARDER__POLL__INTERVAL_SECS)"), "{err}");
    let udp = BASE.replace("type = \"syslog\"", "type = \"syslog\"\nprotocol = \"udp\"");
    let err = load(&udp, &[("MDE_FORWARDER__SINK__SIEM__MAX_DATAGRAM_BYTES", "100")]).unwrap_err();
    assert!(err.contains("sink[0].max_datagram_bytes"), "{err}");
    assert!(err.contains("MDE_FORWARDER__SINK__SIEM__MAX_DATAGRAM_BYTES"), "{err}");
    let err = load(&udp.replace("protocol = \"udp\"", "protocol = \"udp\"\nmax_datagram_bytes = 100"), &[]).unwrap_err();
    assert!(!err.contains("environment variable"), "{err}");
}

/// An empty HEC `index` would be sent as `"index":""`, which Splunk
/// rejects; it is a config error, as empty `source` and `sourcetype` are.
#[test]
fn empty_hec_index_rejected() {
    let hec = format!("{BASE}\n[[sink]]\nname = \"splunk\"\ntype = \"splunk_hec\"\nurl = \"https://splunk.example:8088\"\ntoken = \"t\"\nindex = \" \"\n");
    let err = load(&hec, &[]).unwrap_err();
    assert!(err.contains("sink[1].index"), "{err}");
    assert!(err.contains("must not be empty"), "{err}");
}

/// A value outside an enumeration names the values the key takes, not a
/// Rust type, and an unquoted client_secret, which could be read as
/// another number (`1e3` as `1000`), is rejected.
#[test]
fn enum_and_secret_values_explained() {
    let err = load(&BASE.replace("[state]", "[state]\non_outbox_full = \"dropit\""), &[]).unwrap_err();
    assert!(err.contains("state.on_outbox_full"), "{err}");
    assert!(err.contains("unknown value \"dropit\": use pause or drop_oldest"), "{err}");
    assert!(!err.contains("OutboxFullPolicy"), "{err}");
    let err = load(&format!("{BASE}\n[service]\nlog_format = \"xml\"\n"), &[]).unwrap_err();
    assert!(err.contains("unknown value \"xml\": use text or json"), "{err}");
    let err = load(&BASE.replace("client_secret = \"from-file\"", "client_secret = 1e3"), &[]).unwrap_err();
    assert!(err.contains("tenant[0].client_secret"), "{err}");
    assert!(err.contains("is not in quotes"), "{err}");
}

/// An empty state directory passed check-config and failed only at run
/// time, without naming the key.
#[test]
fn empty_state_dir_rejected() {
    for dir in ["", " "] {
        let err = load(&BASE.replace("dir = \"/tmp/mde-forwarder-test-state\"", &format!("dir = \"{dir}\"")), &[]).unwrap_err();
        assert!(err.contains("state.dir"), "{err}");
    }
    let err = load(BASE, &[("MDE_FORWARDER__STATE__DIR", "")]).unwrap_err();
    assert!(err.contains("MDE_FORWARDER__STATE__DIR"), "{err}");
}

/// Two file sinks on one file could corrupt it when one undoes a failed
/// write over the other's lines, so the config rejects them.
#[test]
fn shared_file_path_rejected() {
    let file = |name: &str, path: &str| format!("\n[[sink]]\nname = \"{name}\"\ntype = \"file\"\npath = \"{path}\"\n");
    let text = format!("{BASE}{}{}", file("archive", "/var/log/mde/a.jsonl"), file("copy", "/var/log//mde/a.jsonl"));
    let err = load(&text, &[]).unwrap_err();
    assert!(err.contains("sink[2].path"), "{err}");
    assert!(err.contains("file sink \"archive\""), "{err}");
    let text = format!("{BASE}{}{}", file("archive", "/var/log/mde/a.jsonl"), file("copy", "/var/log/mde/sub/../a.jsonl"));
    assert!(load(&text, &[]).unwrap_err().contains("sink[2].path"));
    // A directory reached through a symbolic link is the same directory.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("real")).unwrap();
    std::os::unix::fs::symlink(dir.path().join("real"), dir.path().join("link")).unwrap();
    let (real, link) = (dir.path().join("real/a.jsonl"), dir.path().join("link/a.jsonl"));
    let text = format!("{BASE}{}{}", file("archive", real.to_str().unwrap()), file("copy", link.to_str().unwrap()));
    assert!(load(&text, &[]).unwrap_err().contains("sink[2].path"));
    // Directories that do not exist yet, reached through the link, and a
    // file that is a link to the other sink's file.
    let (real, link) = (dir.path().join("real/new/a.jsonl"), dir.path().join("link/new/a.jsonl"));
    let text = format!("{BASE}{}{}", file("archive", real.to_str().unwrap()), file("copy", link.to_str().unwrap()));
    assert!(load(&text, &[]).unwrap_err().contains("sink[2].path"));
    std::fs::write(dir.path().join("real/x.jsonl"), "").unwrap();
    std::os::unix::fs::symlink(dir.path().join("real/x.jsonl"), dir.path().join("real/y.jsonl")).unwrap();
    std::fs::hard_link(dir.path().join("real/x.jsonl"), dir.path().join("real/z.jsonl")).unwrap();
    for other in ["y.jsonl", "z.jsonl"] {
        let (x, y) = (dir.path().join("real/x.jsonl"), dir.path().join("real").join(other));
        let text = format!("{BASE}{}{}", file("archive", x.to_str().unwrap()), file("copy", y.to_str().unwrap()));
        assert!(load(&text, &[]).unwrap_err().contains("sink[2].path"), "{other}");
    }
    let text = format!("{BASE}{}{}", file("archive", "/var/log/mde/a.jsonl"), file("copy", "/var/log/mde/b.jsonl"));
    assert!(load(&text, &[]).is_ok());

}

/// A log level that a tracing filter would read as a module name, such as
/// `warning`, turned every log line off. It is now a config error.
#[test]
fn unknown_log_level_rejected() {
    let service = |level: &str| format!("{BASE}\n[service]\nlog_level = \"{level}\"\n");
    for level in ["warning", "verbose", "info,hyper=loud", "mde-forwarder=debug", "", "hyper=debug", "mde_forwarderx=debug", "mde_forwarder[poll]=debug"] {
        let err = load(&service(level), &[]).unwrap_err();
        assert!(err.contains("service.log_level"), "{level}: {err}");
        assert!(err.contains("use error, warn, info, debug or trace"), "{level:?}: {err}");
    }
    for level in ["warn", "WARN", "info,mde_forwarder=debug", "mde_forwarder::pipeline=trace", "off", "info ", " warn", "info, mde_forwarder=debug", "mde_forwarder=4", "mde_forwarder="] {
        assert!(load(&service(level), &[]).is_ok(), "{level}");
    }
    let err = load(&format!("{BASE}"), &[("MDE_FORWARDER__SERVICE__LOG_LEVEL", "warning")]).unwrap_err();
    assert!(err.contains("service.log_level"), "{err}");
}

/// A TOML syntax error names its line and column, and not the line's text,
/// which may contain a secret.
#[test]
fn syntax_errors_name_line_not_text() {
    let text = format!("{BASE}\n[poll]\ninterval_secs = 99999999999999999999999\n");
    let err = load(&text, &[]).unwrap_err();
    let line = text.lines().position(|l| l.starts_with("interval_secs")).unwrap() + 1;
    assert!(err.contains(&format!("at line {line}, column 17")), "{err}");
    let text = format!("{BASE}\nclient_secret = \"unterminated-s3cret\n");
    let err = load(&text, &[]).unwrap_err();
    assert!(err.contains("invalid TOML"), "{err}");
    assert!(!err.contains("unterminated-s3cret"), "{err}");
}

/// A header given as a string instead of a table names the key and type,
/// but not the value, which contains a secret such as a bearer token.
#[test]
fn type_errors_hide_secret_values() {
    let text = format!("{BASE}{HTTP_SINK}headers = \"Authorization: Bearer file-s3cret\"\n");
    let err = load(&text, &[]).unwrap_err();
    assert!(err.contains("sink[1].headers"), "{err}");
    assert!(err.contains("expected a map"), "{err}");
    assert!(!err.contains("file-s3cret"), "{err}");
    let text = format!("{BASE}{HTTP_SINK}headers = {{ Authorization = 987654321 }}\n");
    let err = load(&text, &[]).unwrap_err();
    assert!(err.contains("sink[1].headers"), "{err}");
    assert!(!err.contains("987654321"), "{err}");
    let text = BASE.replace("region = \"eu\"", "region = \"eu\"\nclient_secret = 123456789012345678901234567890");
    let err = load(&text, &[]).unwrap_err();
    assert!(!err.contains("123456789012345678901234567890"), "{err}");
    let err = load(&format!("{BASE}{HTTP_SINK}"), &[("MDE_FORWARDER__SINK__COLLECTOR__HEADERS", "Authorization: Bearer env-s3cret")]).unwrap_err();
    assert!(err.contains("MDE_FORWARDER__SINK__COLLECTOR__HEADERS"), "{err}");
    assert!(!err.contains("env-s3cret"), "{err}");
}

#[test]
fn type_errors_name_key_and_type() {
    let tenant = |line: &str| BASE.replace("region = \"eu\"", &format!("region = \"eu\"\n{line}"));
    let poll = |line: &str| format!("{BASE}\n[poll]\n{line}\n");
    let syslog = |line: &str| BASE.replace("type = \"syslog\"", &format!("type = \"syslog\"\nprotocol = \"udp\"\n{line}"));
    let http = |line: &str| format!("{BASE}{HTTP_SINK}{line}\n");
    // A number where a string belongs is a sink case only: the config crate
    // turns `client_id = 42` in other sections into the string "42".
    let cases = [
        (tenant("limit = -1"), "tenant[0].limit", "an unsigned 64 bit or less integer"),
        (tenant("token_refresh_margin_secs = \"soon\""), "tenant[0].token_refresh_margin_secs", "an integer"),
        (tenant("resource = { url = 1 }"), "tenant[0].resource", "a string"),
        (tenant("machine_groups = [\"servers\", [\"nested\"]]"), "tenant[0].machine_groups[1]", "a string"),
        (poll("interval_secs = \"sixty\""), "poll.interval_secs", "an integer"),
        (poll("interval_secs = -1"), "poll.interval_secs", "an unsigned 64 bit or less integer"),
        (poll("connect_timeout_secs = { secs = 5 }"), "poll.connect_timeout_secs", "an integer"),
        (BASE.replace("[state]", "[state]\nmax_outbox_bytes = -2"), "state.max_outbox_bytes", "an unsigned 64 bit or less integer"),
        (syslog("max_datagram_bytes = -1"), "sink[0].max_datagram_bytes", "usize"),
        (syslog("max_datagram_bytes = \"big\""), "sink[0].max_datagram_bytes", "usize"),
        (syslog("hostname = 5"), "sink[0].hostname", "a string"),
        (syslog("hostname = { name = \"x\" }"), "sink[0].hostname", "a string"),
        (syslog("batch_size = -5"), "sink[0].batch_size", "usize"),
        (syslog("cef_vendor = 5"), "sink[0].cef_vendor", "a string"),
        (syslog("tenants = [\"contoso-eu\", 3]"), "sink[0].tenants[1]", "a string"),
        (syslog("tenants = \"contoso-eu\""), "sink[0].tenants", "a sequence"),
        (syslog("tls_insecure_skip_verify = \"yes\""), "sink[0].tls_insecure_skip_verify", "a boolean"),
        (http("gzip = \"yes\""), "sink[1].gzip", "a boolean"),
        (http("proxy_url = 3128"), "sink[1].proxy_url", "a string"),
        (http("timeout_secs = -30"), "sink[1].timeout_secs", "u64"),
        (http("headers = { \"X-Id\" = [1] }"), "sink[1].headers.X-Id", "a string"),
    ];
    for (text, key, expected) in cases {
        let err = load(&text, &[]).unwrap_err();
        assert!(err.contains(&format!("`{key}`")), "{key}: the key is named: {err}");
        assert!(err.contains(&format!("expected {expected}")), "{key}: the expected type is named: {err}");
    }
}

#[test]
fn type_errors_from_environment_name_variable() {
    let udp = BASE.replace("type = \"syslog\"", "type = \"syslog\"\nprotocol = \"udp\"");
    let cases = [
        ("MDE_FORWARDER__POLL__INTERVAL_SECS", "sixty", "poll.interval_secs"),
        ("MDE_FORWARDER__TENANT__CONTOSO_EU__LIMIT", "-1", "tenant[0].limit"),
        ("MDE_FORWARDER__SINK__SIEM__BATCH_SIZE", "many", "sink[0].batch_size"),
        ("MDE_FORWARDER__SINK__0__MAX_DATAGRAM_BYTES", "-1", "sink[0].max_datagram_bytes"),
        ("MDE_FORWARDER__SINK__SIEM__TLS_INSECURE_SKIP_VERIFY", "maybe", "sink[0].tls_insecure_skip_verify"),
    ];
    for (variable, value, key) in cases {
        let err = load(&udp, &[(variable, value)]).unwrap_err();
        assert!(err.contains(&format!("`{key}`")), "{variable}: the key is named: {err}");
        assert!(err.contains(variable), "{variable}: the variable is named: {err}");
    }
}

#[test]
fn udp_datagram_size_limits() {
    let udp = |bytes: usize| BASE.replace("type = \"syslog\"", &format!("type = \"syslog\"\nprotocol = \"udp\"\nmax_datagram_bytes = {bytes}"));
    for bytes in [0, 479] {
        let err = load(&udp(bytes), &[]).unwrap_err();
        assert!(err.contains("sink[0].max_datagram_bytes"), "{bytes}: {err}");
        assert!(err.contains(&bytes.to_string()), "{bytes}: the value is named: {err}");
        assert!(err.contains("from 480 to 65507"), "{bytes}: the allowed range is named: {err}");
    }
    // Values above the largest UDP payload load, as in earlier releases, and
    // the sink caps them at 65507.
    for bytes in [480, 2048, 65_507, 65_508, 1_000_000] {
        assert!(load(&udp(bytes), &[]).is_ok(), "{bytes} loads");
    }
}

#[test]
fn datagram_size_loads_off_udp() {
    let syslog = |protocol: &str, line: &str| {
        BASE.replace("type = \"syslog\"", &format!("type = \"syslog\"\nprotocol = \"{protocol}\"\ntls_insecure_skip_verify = {}\n{line}", protocol == "tls"))
    };
    // Configs of earlier releases set the key on TCP sinks, and they keep
    // loading: the sink ignores it with a warning at start.
    for protocol in ["tcp", "tls"] {
        for line in ["max_datagram_bytes = 480", "max_datagram_bytes = 2048", "max_datagram_bytes = 8192", ""] {
            assert!(load(&syslog(protocol, line), &[]).is_ok(), "{protocol} {line:?} loads");
        }
    }
    assert!(load(&syslog("tcp", ""), &[("MDE_FORWARDER__SINK__SIEM__MAX_DATAGRAM_BYTES", "4096")]).is_ok());
    assert!(load(&syslog("udp", "max_datagram_bytes = 8192"), &[]).is_ok(), "udp takes the key");
}

/// Headers that leave a UDP datagram no room for a FullId are a config
/// error, not a stream of messages that all lose it.
#[test]
fn datagram_without_room_rejected() {
    let udp = |lines: &str| BASE.replace("type = \"syslog\"", &format!("type = \"syslog\"\nprotocol = \"udp\"\n{lines}"));
    let vendor = "V".repeat(600);
    for format in ["cef", "leef"] {
        let err = load(&udp(&format!("format = \"{format}\"\nmax_datagram_bytes = 480\ncef_vendor = \"{vendor}\"")), &[]).unwrap_err();
        assert!(err.contains("`sink[0].max_datagram_bytes`"), "{format}: {err}");
        assert!(err.contains("shorten cef_vendor"), "{format}: {err}");
        assert!(load(&udp(&format!("format = \"{format}\"\nmax_datagram_bytes = 2048\ncef_vendor = \"{vendor}\"")), &[]).is_ok(), "{format}: a larger datagram has room");
    }
    // JSON has no vendor in its header.
    assert!(load(&udp(&format!("format = \"json\"\nmax_datagram_bytes = 480\ncef_vendor = \"{vendor}\"")), &[]).is_ok());
    let host = "h".repeat(300);
    let err = load(&udp(&format!("max_datagram_bytes = 480\nhostname = \"{host}\"")), &[]).unwrap_err();
    assert!(err.contains("`sink[0].max_datagram_bytes`"), "{err}");
    assert!(load(&udp("max_datagram_bytes = 480"), &[]).is_ok(), "a usual header leaves room");
}

#[test]
fn datagram_size_unknown_off_syslog() {
    let http = BASE.replace(
        "type = \"syslog\"\naddress = \"127.0.0.1:514\"",
        "type = \"http\"\nurl = \"https://collector.example/ingest\"\nmax_datagram_bytes = 2048",
    );
    let err = load(&http, &[]).unwrap_err();
    assert!(err.contains("unknown field `max_datagram_bytes`"), "{err}");
}

/// A timeout far beyond any sensible wait would overflow the deadline the
/// HEC sink computes for its acknowledgement polls, and stop the sink.
#[test]
fn http_sink_timeouts_have_a_maximum() {
    let hec = "[[sink]]\nname = \"splunk\"\ntype = \"splunk_hec\"\nurl = \"https://splunk.example:8088\"\ntoken = \"t0ken\"\n";
    let http = "[[sink]]\nname = \"collector\"\ntype = \"http\"\nurl = \"https://collector.example/ingest\"\n";
    let cases = [
        (hec, "ack = true\nack_timeout_secs = 9223372036854775807", "sink[1].ack_timeout_secs"),
        (hec, "ack = true\nack_timeout_secs = 3601", "sink[1].ack_timeout_secs"),
        (hec, "timeout_secs = 9223372036854775807", "sink[1].timeout_secs"),
        (http, "timeout_secs = 3601", "sink[1].timeout_secs"),
    ];
    for (sink, keys, key) in cases {
        let err = load(&format!("{BASE}\n{sink}{keys}\n"), &[]).unwrap_err();
        assert!(err.contains(key), "{keys}: {err}");
        assert!(err.contains("use a value from 1 to 3600"), "{keys}: {err}");
    }
    let loaded = load(&format!("{BASE}\n{hec}ack_timeout_secs = 0\n"), &[]);
    assert!(loaded.is_ok(), "without ack the key is not used: {loaded:?}");
}

/// UDP sends one message per datagram, so octet-counting is rejected there,
/// while the values earlier releases accepted still load.
#[test]
fn udp_rejects_octet_counting_framing() {
    let udp_with = |framing: &str| BASE.replace("type = \"syslog\"", &format!("type = \"syslog\"\nprotocol = \"udp\"\nframing = \"{framing}\""));
    let err = load(&udp_with("octet-counting"), &[]).unwrap_err();
    assert!(err.contains("sink[0].framing"), "{err}");
    assert!(err.contains("framing applies to tcp and tls"), "{err}");
    assert!(err.contains("remove it"), "{err}");
    // Configs from earlier releases may set these; they load and are ignored.
    for framing in ["newline", "none"] {
        assert!(load(&udp_with(framing), &[]).is_ok(), "{framing} on UDP loads");
    }
    let text = BASE.replace("type = \"syslog\"", "type = \"syslog\"\nprotocol = \"udp\"");
    assert!(load(&text, &[]).is_ok(), "UDP without framing loads");
}

/// `confirm` takes "close" and "tcp-ack" on TCP and TLS, and is rejected
/// on UDP, which has no acknowledgement.
#[test]
fn confirm_applies_to_tcp_and_tls() {
    let with = |protocol: &str, confirm: &str| {
        BASE.replace("type = \"syslog\"", &format!("type = \"syslog\"\nprotocol = \"{protocol}\"\nconfirm = \"{confirm}\""))
    };
    for confirm in ["close", "tcp-ack"] {
        assert!(load(&with("tcp", confirm), &[]).is_ok(), "{confirm} on TCP loads");
    }
    let err = load(&with("udp", "tcp-ack"), &[]).unwrap_err();
    assert!(err.contains("sink[0].confirm"), "{err}");
    assert!(err.contains("remove it"), "{err}");
    let err = load(&with("tcp", "fin"), &[]).unwrap_err();
    assert!(err.contains("tcp-ack"), "the error lists the values: {err}");
}

/// A sink URL that is not valid is named in the error without the user,
/// password and query it may carry.
#[test]
fn invalid_sink_url_error_hides_credentials() {
    let hec_token = "token = \"t0ken-value\"\n";
    let urls = [
        ("http", "", "https://alice:pw-secret-123@collector.example:99999/ingest?token=q-secret-456"),
        ("http", "", "ftp://alice:pw-secret-123@collector.example/ingest?token=q-secret-456"),
        ("splunk_hec", hec_token, "https://alice:pw-secret-123@splunk example:8088"),
        ("splunk_hec", hec_token, "https://alice:pw-secret-123@splunk.example:8088/?token=q-secret-456"),
        ("http", "", "http://alice:pw-secret-123?more@127.0.0.1:1/"),
        ("http", "", "alice:pw-secret-123@127.0.0.1:1"),
        ("splunk_hec", hec_token, "alice:pw-secret-123@127.0.0.1:1"),
    ];
    for (kind, extra, url) in urls {
        let sink = format!("[[sink]]\nname = \"collector\"\ntype = \"{kind}\"\n{extra}url = \"{url}\"\n");
        let text = BASE.replace("[[sink]]\nname = \"siem\"\ntype = \"syslog\"\naddress = \"127.0.0.1:514\"\n", &sink);
        let err = load(&text, &[]).unwrap_err();
        assert!(err.contains("sink[0].url"), "{url}: {err}");
        for secret in ["alice", "pw-secret-123", "q-secret-456"] {
            assert!(!err.contains(secret), "{url}: {secret} shown: {err}");
        }
    }
}

#[test]
fn duplicate_names_are_rejected() {
    let text = BASE.to_string() + "\n[[sink]]\nname = \"siem\"\ntype = \"stdout\"\n";
    let err = load(&text, &[]).unwrap_err();
    assert!(err.contains("duplicate sink name \"siem\""), "{err}");
}

#[test]
fn secret_file_is_read_and_trimmed_and_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "s3cr3t-from-file\n").unwrap();
    let text = BASE.replace("client_secret = \"from-file\"", &format!("client_secret_file = \"{}\"", secret.display()));
    let config = load(&text, &[]).unwrap();
    let tenants = config.resolve_tenants().unwrap();
    match &tenants[0].credential {
        mde_forwarder::config::ClientCredential::Secret(secret) => assert_eq!(secret.expose(), "s3cr3t-from-file"),
        other => panic!("expected a secret, got {other:?}"),
    }
    assert!(!format!("{tenants:?}").contains("s3cr3t"));
}

#[test]
fn api_url_yields_exactly_one_alerts_path() {
    for api_url in ["http://127.0.0.1:9000", "http://127.0.0.1:9000/", "http://127.0.0.1:9000/api/alerts", "http://127.0.0.1:9000/api/alerts/"] {
        let text = BASE.replace("region = \"eu\"", &format!("api_url = \"{api_url}\"\nlogin_url = \"http://127.0.0.1:9000/\""));
        let tenants = load(&text, &[]).unwrap().resolve_tenants().unwrap();
        assert_eq!(tenants[0].alerts_url, "http://127.0.0.1:9000/api/alerts", "{api_url}");
        assert_eq!(tenants[0].token_url, "http://127.0.0.1:9000/tid/oauth2/token", "{api_url}");
    }
}

#[test]
fn example_config_is_valid() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/mde-forwarder.example.toml");
    let config = Config::load_with_env(&path, &[]).unwrap_or_else(|e| panic!("{e}"));
    assert!(!config.tenants.is_empty());
    assert!(!config.sinks.is_empty());
}

#[test]
fn fraction_in_a_sink_is_rejected() {
    let err = load(&BASE.replace("[[sink]]\nname", "[[sink]]\nbatch_size = 1.5\nname"), &[]).unwrap_err();
    assert!(err.contains("`sink[0].batch_size`: is 1.5, a number with a fraction"), "{err}");
}

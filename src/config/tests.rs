use std::path::Path;

use super::*;

const SINK: &str = "[[sink]]\nname = \"out\"\ntype = \"stdout\"\n";

/// Loads a config whose only tenant has the given extra lines.
fn load(dir: &Path, tenant_lines: &str, poll_lines: &str) -> Result<Config, ConfigError> {
    let text = format!(
        "[state]\ndir = \"{}\"\n[poll]\n{poll_lines}\n[[tenant]]\nname = \"contoso\"\ntenant_id = \"t-1\"\nclient_id = \"app-1\"\n{tenant_lines}\n{SINK}",
        dir.join("state").display()
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    Config::load_with_env(&path, &[])
}

fn resolve_one(dir: &Path, tenant_lines: &str) -> Result<ResolvedTenant, ConfigError> {
    let config = load(dir, tenant_lines, "")?;
    config.resolve_tenants_with(&|_| None).map(|mut tenants| tenants.remove(0))
}

fn error_text(result: Result<impl std::fmt::Debug, ConfigError>) -> String {
    result.expect_err("expected a config error").to_string()
}

#[test]
fn region_presets_resolve_to_their_endpoints() {
    let public = "https://login.microsoftonline.com";
    let government = "https://login.microsoftonline.us";
    let cases = [
        ("eu", "https://wdatp-alertexporter-eu.windows.com", public),
        ("us", "https://wdatp-alertexporter-us.windows.com", public),
        ("uk", "https://wdatp-alertexporter-uk.windows.com", public),
        ("gcc", "https://wdatp-alertexporter-us.gcc.securitycenter.windows.us", public),
        ("gcc-high", "https://wdatp-alertexporter-us.securitycenter.windows.us", government),
        ("dod", "https://wdatp-alertexporter-us.securitycenter.windows.us", government),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (region, api, login) in cases {
        let lines = format!("client_secret = \"s\"\nregion = \"{region}\"");
        let tenant = resolve_one(dir.path(), &lines).unwrap();
        assert_eq!(tenant.alerts_url, format!("{api}/api/alerts"), "{region}");
        assert_eq!(tenant.token_url, format!("{login}/t-1/oauth2/token"), "{region}");
    }
}

#[test]
fn token_endpoint_v2_uses_v2_path() {
    let dir = tempfile::tempdir().unwrap();
    let v1 = resolve_one(dir.path(), "client_secret = \"s\"\nregion = \"dod\"\ntoken_endpoint = \"v1\"").unwrap();
    assert_eq!(v1.token_url, "https://login.microsoftonline.us/t-1/oauth2/token");
    let v2 = resolve_one(dir.path(), "client_secret = \"s\"\nregion = \"dod\"\ntoken_endpoint = \"v2\"").unwrap();
    assert_eq!(v2.token_url, "https://login.microsoftonline.us/t-1/oauth2/v2.0/token");
    assert_eq!(v2.token_endpoint, TokenEndpoint::V2);
}

#[test]
fn url_overrides_win_over_region() {
    let dir = tempfile::tempdir().unwrap();
    let lines = "client_secret = \"s\"\nregion = \"eu\"\napi_url = \"http://127.0.0.1:9/\"\nlogin_url = \"http://127.0.0.1:8/\"";
    let tenant = resolve_one(dir.path(), lines).unwrap();
    assert_eq!(tenant.alerts_url, "http://127.0.0.1:9/api/alerts");
    assert_eq!(tenant.token_url, "http://127.0.0.1:8/t-1/oauth2/token");
}

#[test]
fn api_url_suffixes_give_one_api_alerts() {
    let cases = [
        "https://api.example",
        "https://api.example/",
        "https://api.example//",
        "https://api.example/api",
        "https://api.example/api/",
        "https://api.example/api/alerts",
        "https://api.example/api/alerts/",
        "https://api.example/API/Alerts",
        "https://api.example/Api/ALERTS/",
        "https://api.example/API",
    ];
    let dir = tempfile::tempdir().unwrap();
    for api_url in cases {
        let lines = format!("client_secret = \"s\"\nregion = \"eu\"\napi_url = \"{api_url}\"");
        let tenant = resolve_one(dir.path(), &lines).unwrap();
        assert_eq!(tenant.alerts_url, "https://api.example/api/alerts", "{api_url}");
    }
}

#[test]
fn api_url_keeps_a_path_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let lines = "client_secret = \"s\"\nregion = \"eu\"\napi_url = \"https://gateway.example/mde/api/alerts/\"";
    let tenant = resolve_one(dir.path(), lines).unwrap();
    assert_eq!(tenant.alerts_url, "https://gateway.example/mde/api/alerts");
}

#[test]
fn api_url_with_query_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let lines = "client_secret = \"s\"\nregion = \"eu\"\napi_url = \"https://api.example/api/alerts?limit=5\"";
    let message = error_text(resolve_one(dir.path(), lines));
    assert!(message.contains("tenant[0].api_url"), "{message}");
}

#[test]
fn missing_region_and_urls_names_region() {
    let dir = tempfile::tempdir().unwrap();
    let message = error_text(resolve_one(dir.path(), "client_secret = \"s\""));
    assert!(message.contains("tenant[0].region"), "{message}");
}

#[test]
fn secret_file_drops_trailing_newline() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("secret");
    std::fs::write(&file, "from-file\n").unwrap();
    let lines = format!("region = \"eu\"\nclient_secret_file = \"{}\"", file.display());
    let tenant = resolve_one(dir.path(), &lines).unwrap();
    assert_eq!(tenant.secret().map(Secret::expose), Some("from-file"));
}

#[test]
fn secret_env_reads_the_named_variable() {
    let dir = tempfile::tempdir().unwrap();
    let config = load(dir.path(), "region = \"eu\"\nclient_secret_env = \"CONTOSO_SECRET\"", "").unwrap();
    let env = |name: &str| (name == "CONTOSO_SECRET").then(|| OsString::from("from-env"));
    let tenant = config.resolve_tenants_with(&env).unwrap().remove(0);
    assert_eq!(tenant.secret().map(Secret::expose), Some("from-env"));
}

#[test]
fn secret_env_unset_names_key_and_variable() {
    let dir = tempfile::tempdir().unwrap();
    let message = error_text(resolve_one(dir.path(), "region = \"eu\"\nclient_secret_env = \"CONTOSO_SECRET\""));
    assert!(message.contains("tenant[0].client_secret_env"), "{message}");
    assert!(message.contains("CONTOSO_SECRET is not set"), "{message}");
}

#[test]
fn systemd_credential_reads_credentials_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("mde-secret"), "from-systemd\n").unwrap();
    let config = load(dir.path(), "region = \"eu\"\nclient_secret_credential = \"mde-secret\"", "").unwrap();
    let credentials = dir.path().as_os_str().to_owned();
    let env = |name: &str| (name == "CREDENTIALS_DIRECTORY").then(|| credentials.clone());
    let tenant = config.resolve_tenants_with(&env).unwrap().remove(0);
    assert_eq!(tenant.secret().map(Secret::expose), Some("from-systemd"));
}

#[test]
fn systemd_credential_without_directory_is_explained() {
    let dir = tempfile::tempdir().unwrap();
    let message = error_text(resolve_one(dir.path(), "region = \"eu\"\nclient_secret_credential = \"mde-secret\""));
    assert!(message.contains("tenant[0].client_secret_credential"), "{message}");
    assert!(message.contains("CREDENTIALS_DIRECTORY is not set"), "{message}");
    assert!(message.contains("LoadCredential=mde-secret"), "{message}");
}

#[test]
fn systemd_credential_name_must_not_be_a_path() {
    let dir = tempfile::tempdir().unwrap();
    let config = load(dir.path(), "region = \"eu\"\nclient_secret_credential = \"../etc/passwd\"", "").unwrap();
    let env = |_: &str| Some(OsString::from("/run/credentials/x"));
    let message = error_text(config.resolve_tenants_with(&env));
    assert!(message.contains("not a credential name"), "{message}");
}

#[test]
fn two_credential_sources_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let lines = "region = \"eu\"\nclient_secret = \"inline-value\"\nclient_secret_env = \"X\"";
    let message = error_text(load(dir.path(), lines, ""));
    assert!(message.contains("tenant[0].client_secret_env"), "{message}");
    assert!(message.contains("client_secret and client_secret_env"), "{message}");
    assert!(!message.contains("inline-value"), "{message}");
}

#[test]
fn missing_credential_lists_every_source() {
    let dir = tempfile::tempdir().unwrap();
    let message = error_text(load(dir.path(), "region = \"eu\"", ""));
    assert!(message.contains("tenant[0].client_secret"), "{message}");
    for source in ["client_secret_file", "client_secret_env", "client_secret_credential", "client_certificate_file"] {
        assert!(message.contains(source), "{source}: {message}");
    }
}

#[test]
fn empty_secret_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let message = error_text(resolve_one(dir.path(), "region = \"eu\"\nclient_secret = \"\""));
    assert!(message.contains("tenant[0].client_secret"), "{message}");
}

#[test]
fn certificate_credential_loads_pem_files() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let dir = tempfile::tempdir().unwrap();
    let lines = format!(
        "region = \"eu\"\nclient_certificate_file = \"{}\"\nclient_certificate_key_file = \"{}\"",
        data.join("client-cert.pem").display(),
        data.join("client-key.pem").display()
    );
    let tenant = resolve_one(dir.path(), &lines).unwrap();
    assert!(matches!(tenant.credential, ClientCredential::Certificate(_)));
    assert!(tenant.secret().is_none());
}

#[test]
fn certificate_without_key_names_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let message = error_text(load(dir.path(), "region = \"eu\"\nclient_certificate_file = \"/nonexistent.pem\"", ""));
    assert!(message.contains("tenant[0].client_certificate_key_file"), "{message}");
}

#[test]
fn certificate_with_wrong_key_is_rejected() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let dir = tempfile::tempdir().unwrap();
    let lines = format!(
        "region = \"eu\"\nclient_certificate_file = \"{}\"\nclient_certificate_key_file = \"{}\"",
        data.join("client-cert.pem").display(),
        data.join("other-key.pem").display()
    );
    let message = error_text(resolve_one(dir.path(), &lines));
    assert!(message.contains("tenant[0].client_certificate_file"), "{message}");
    assert!(message.contains("does not belong to the certificate"), "{message}");
}

#[test]
fn inline_secret_in_readable_file_warns() {
    use std::os::unix::fs::PermissionsExt;

    let dir = tempfile::tempdir().unwrap();
    load(dir.path(), "region = \"eu\"\nclient_secret = \"inline-value\"", "").unwrap();
    let path = dir.path().join("config.toml");

    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let warning = inline_secret_warning(&path).expect("a warning for mode 644");
    assert!(warning.contains(&path.display().to_string()), "{warning}");
    assert!(warning.contains("chmod 600"), "{warning}");
    assert!(warning.contains("client_secret_file"), "{warning}");
    assert!(!warning.contains("inline-value"), "{warning}");

    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(inline_secret_warning(&path), None);
}

#[test]
fn secret_file_reference_does_not_warn() {
    use std::os::unix::fs::PermissionsExt;

    let dir = tempfile::tempdir().unwrap();
    load(dir.path(), "region = \"eu\"\nclient_secret_env = \"X\"", "").unwrap();
    let path = dir.path().join("config.toml");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert_eq!(inline_secret_warning(&path), None);
}

#[test]
fn proxy_url_error_hides_the_url() {
    let dir = tempfile::tempdir().unwrap();
    let message = error_text(load(dir.path(), "region = \"eu\"\nclient_secret = \"s\"", "proxy_url = \"ftp://user:pw-123@proxy\""));
    assert!(message.contains("poll.proxy_url"), "{message}");
    assert!(!message.contains("pw-123"), "{message}");
}

#[test]
fn resolved_tenant_debug_hides_the_secret() {
    let dir = tempfile::tempdir().unwrap();
    let tenant = resolve_one(dir.path(), "region = \"eu\"\nclient_secret = \"inline-value\"").unwrap();
    let debug = format!("{tenant:?}");
    assert!(!debug.contains("inline-value"), "{debug}");
}

#[test]
fn tenant_limit_is_resolved() {
    let dir = tempfile::tempdir().unwrap();
    let tenant = resolve_one(dir.path(), "region = \"eu\"\nclient_secret = \"s\"\nlimit = 25").unwrap();
    assert_eq!(tenant.limit, Some(25));
}

#[test]
fn zero_outbox_size_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[state]\ndir = \"{}\"\nmax_outbox_bytes = 0\non_outbox_full = \"drop_oldest\"\n[[tenant]]\nname = \"contoso\"\ntenant_id = \"t-1\"\nclient_id = \"app-1\"\n{SINK}",
        dir.path().join("state").display()
    );
    let path = dir.path().join("config.toml");
    std::fs::write(&path, text).unwrap();
    let error = error_text(Config::load_with_env(&path, &[]));
    assert!(error.contains("state.max_outbox_bytes"), "{error}");
}

#[test]
fn severity_routing_ignores_case_and_spaces() {
    for (text, level) in [(" High ", SeverityLevel::High), ("\tlow", SeverityLevel::Low), ("INFORMATIONAL ", SeverityLevel::Informational), ("odd", SeverityLevel::Medium)] {
        assert_eq!(SeverityLevel::from_api(Some(text)), level, "{text:?}");
    }
    assert_eq!(SeverityLevel::from_api(None), SeverityLevel::Medium);
}

/// A fraction was rounded without a word in [poll], [state] and [service].
#[test]
fn fraction_in_poll_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let error = error_text(load(dir.path(), "region = \"eu\"\nclient_secret = \"s\"", "interval_secs = 1.5"));
    assert!(error.contains("`poll.interval_secs`: is 1.5, a number with a fraction"), "{error}");
}

#[test]
fn fraction_in_a_tenant_names_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let error = error_text(load(dir.path(), "region = \"eu\"\nclient_secret = \"s\"\ntoken_refresh_margin_secs = 60.5", ""));
    assert!(error.contains("`tenant[0].token_refresh_margin_secs`"), "{error}");
}

#[test]
fn fraction_in_a_secret_key_is_not_shown() {
    let dir = tempfile::tempdir().unwrap();
    let error = error_text(load(dir.path(), "region = \"eu\"\nclient_secret = \"s\"\nclient_secret_env = 12.25", ""));
    assert!(error.contains("tenant[0].client_secret_env"), "{error}");
    assert!(!error.contains("12.25"), "{error}");
}

#[test]
fn empty_secret_file_names_the_file_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("secret");
    std::fs::write(&file, "\n").unwrap();
    let message = error_text(resolve_one(dir.path(), &format!("region = \"eu\"\nclient_secret_file = \"{}\"", file.display())));
    assert!(message.contains("`tenant[0].client_secret_file`: is empty: the file"), "{message}");
}

#[test]
fn unquoted_hec_token_asks_for_quotes() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[state]\ndir = \"{}\"\n[[tenant]]\nname = \"contoso\"\nregion = \"eu\"\ntenant_id = \"t-1\"\nclient_id = \"app-1\"\nclient_secret = \"s\"\n[[sink]]\nname = \"hec\"\ntype = \"splunk_hec\"\nurl = \"https://127.0.0.1:8088\"\ntoken = 1e3\n",
        dir.path().join("state").display()
    );
    let path = dir.path().join("config.toml");
    std::fs::write(&path, text).unwrap();
    let error = error_text(Config::load_with_env(&path, &[]));
    assert!(error.contains("`sink[0].token`: is not in quotes"), "{error}");
}

#[test]
fn log_filter_with_unknown_module_is_rejected() {
    let problem = log_filter_problem("info,mde_forwarder::nosuch=debug").expect("a module that does not exist");
    assert!(problem.contains("names no module of the forwarder"), "{problem}");
    assert_eq!(log_filter_problem("info,mde_forwarder::sink::stream=debug"), None);
}

#[test]
fn log_filter_modules_match_the_crate() {
    let declared: Vec<&str> = include_str!("../lib.rs").lines().filter_map(|line| line.strip_prefix("pub mod ")?.strip_suffix(';')).collect();
    let mut declared = declared;
    declared.sort_unstable();
    assert_eq!(declared, FORWARDER_MODULES);
}

#[test]
fn unknown_key_from_env_names_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    load(dir.path(), "region = \"eu\"\nclient_secret = \"s\"", "").expect("the file alone is valid");
    let path = dir.path().join("config.toml");
    let env = [("MDE_FORWARDER__POLL__INTERVALSECS".to_string(), "30".to_string())];
    let error = error_text(Config::load_with_env(&path, &env));
    assert!(error.contains("unknown field `intervalsecs`"), "{error}");
    assert!(error.contains("set by the environment variable MDE_FORWARDER__POLL__INTERVALSECS"), "{error}");
}

#[test]
fn empty_secret_file_path_asks_for_a_path() {
    let dir = tempfile::tempdir().unwrap();
    let message = error_text(resolve_one(dir.path(), "region = \"eu\"\nclient_secret_file = \"\""));
    assert!(message.contains("`tenant[0].client_secret_file`: is empty; set the path"), "{message}");
}

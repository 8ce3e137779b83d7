//! Every way a tenant connects, end to end against the emulator on
//! 127.0.0.1: token endpoints, credentials, proxies, TLS, gzip, limits,
//! credential rejections and one-off pulls.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use mde_forwarder::auth::TokenSource;
use mde_forwarder::config::{Config, ResolvedTenant};
use mde_forwarder::emulator::{Emulator, EmulatorOptions};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

/// Builds a `[[tenant]]` whose credential and URLs are given as TOML lines.
fn tenant_with(name: &str, lines: &str) -> String {
    format!("\n[[tenant]]\nname = \"{name}\"\ntenant_id = \"{TENANT_ID}\"\nclient_id = \"{CLIENT_ID}\"\n{lines}\n")
}

fn urls(base: &str) -> String {
    format!("api_url = \"{base}\"\nlogin_url = \"{base}\"\n")
}

fn secret_line(secret: &str) -> String {
    format!("client_secret = \"{secret}\"\n")
}

fn certificate_lines() -> String {
    format!(
        "client_certificate_file = \"{}\"\nclient_certificate_key_file = \"{}\"\n",
        data("client-cert.pem").display(),
        data("client-key.pem").display()
    )
}

/// Returns an address on 127.0.0.1 where nothing listens.

/// Returns an address on 127.0.0.1, which the test certificates name, for
/// a receiver that only a proxy reaches: nothing connects to it directly.
fn unused_local_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

fn all_output(output: &std::process::Output) -> String {
    stdout(output) + &stderr(output)
}

// ---------------------------------------------------------------- token endpoints

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_and_v2_token_endpoints_deliver() {
    for endpoint in ["v1", "v2"] {
        let emulator = emulator_with_samples(EmulatorOptions::default()).await;
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("a.jsonl");
        let lines = urls(&emulator.url()) + &secret_line(CLIENT_SECRET) + &format!("token_endpoint = \"{endpoint}\"\n");
        let config = write_config(dir.path(), "", &tenant_with("contoso", &lines), &file_sink_toml("archive", &archive));

        assert_success(&run_once(&config).await);

        assert_eq!(emulator.token_requests(), 1, "{endpoint}");
        assert_eq!(read_json_lines(&archive).len(), 46, "{endpoint}");
    }
}

// ---------------------------------------------------------------- credentials

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_credential_delivers() {
    for endpoint in ["v1", "v2"] {
        let emulator = emulator_with_samples(EmulatorOptions::default()).await;
        emulator.add_client_certificate(TENANT_ID, &std::fs::read(data("client-cert.pem")).unwrap()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("a.jsonl");
        let lines = urls(&emulator.url()) + &certificate_lines() + &format!("token_endpoint = \"{endpoint}\"\n");
        let config = write_config(dir.path(), "", &tenant_with("contoso", &lines), &file_sink_toml("archive", &archive));

        assert_success(&run_once(&config).await);

        assert_eq!(read_json_lines(&archive).len(), 46, "{endpoint}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unregistered_certificate_is_rejected_with_hint() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    emulator.add_client_certificate(TENANT_ID, &std::fs::read(data("other-cert.pem")).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let lines = urls(&emulator.url()) + &certificate_lines();
    let config = write_config(dir.path(), "", &tenant_with("contoso", &lines), &file_sink_toml("a", &dir.path().join("a")));

    let output = run_once(&config).await;

    assert_eq!(output.status.code(), Some(1));
    let err = stderr(&output);
    assert!(err.contains("AADSTS700027"), "{err}");
    assert!(err.contains("client_certificate_file is uploaded to the app registration"), "{err}");
    let key = std::fs::read_to_string(data("client-key.pem")).unwrap();
    let key_line = key.lines().nth(1).unwrap();
    assert!(!all_output(&output).contains(key_line), "key material in the output");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_from_env_and_file_deliver() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, format!("{CLIENT_SECRET}\n")).unwrap();
    let from_file = urls(&emulator.url()) + &format!("client_secret_file = \"{}\"\n", secret_file.display());
    let from_env = urls(&emulator.url()) + "client_secret_env = \"CONTOSO_APP_SECRET\"\n";
    let from_credential = urls(&emulator.url()) + "client_secret_credential = \"mde-secret\"\n";
    let credentials = dir.path().join("credentials");
    std::fs::create_dir(&credentials).unwrap();
    std::fs::write(credentials.join("mde-secret"), CLIENT_SECRET).unwrap();
    let tenants = tenant_with("file", &from_file) + &tenant_with("env", &from_env) + &tenant_with("systemd", &from_credential);
    let archive = dir.path().join("a.jsonl");
    let config = write_config(dir.path(), "", &tenants, &file_sink_toml("archive", &archive));

    let env = [("CONTOSO_APP_SECRET", CLIENT_SECRET), ("CREDENTIALS_DIRECTORY", credentials.to_str().unwrap())];
    let output = run_cli_env(&["run", "--once", "--config", config.to_str().unwrap()], &env).await;

    assert_success(&output);
    assert_eq!(emulator.token_requests(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unset_credentials_directory_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let lines = urls("http://127.0.0.1:9") + "client_secret_credential = \"mde-secret\"\n";
    let config = write_config(dir.path(), "", &tenant_with("contoso", &lines), &file_sink_toml("a", &dir.path().join("a")));

    let output = run_cli(&["check-config", "--config", config.to_str().unwrap()]).await;

    assert_eq!(output.status.code(), Some(64));
    assert!(stderr(&output).contains("tenant[0].client_secret_credential"), "{}", stderr(&output));
    assert!(stderr(&output).contains("CREDENTIALS_DIRECTORY is not set"), "{}", stderr(&output));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readable_config_with_inline_secret_warns() {
    use std::os::unix::fs::PermissionsExt;

    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "", &tenant_toml("contoso", TENANT_ID, &emulator), &file_sink_toml("a", &dir.path().join("a")));
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();

    let output = run_once(&config).await;

    assert_success(&output);
    let warning = stderr(&output).lines().find(|l| l.contains("WARN") && l.contains("chmod 600")).map(str::to_string);
    let warning = warning.unwrap_or_else(|| panic!("no WARN line: {}", stderr(&output)));
    assert!(warning.contains(config.to_str().unwrap()), "{warning}");
    assert!(!all_output(&output).contains(CLIENT_SECRET));
}

// ---------------------------------------------------------------- secrets and AAD errors

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_secret_logs_one_aadsts_line_without_secret() {
    const WRONG: &str = "Wr0ng-Secret-Value-Never-Logged";
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let lines = urls(&emulator.url()) + &secret_line(WRONG);
    let config = write_config(dir.path(), "", &tenant_with("contoso", &lines), &file_sink_toml("a", &dir.path().join("a")));

    let output = run_cli_env(&["run", "--once", "--config", config.to_str().unwrap()], &[("RUST_LOG", "debug")]).await;

    assert_eq!(output.status.code(), Some(1));
    let all = all_output(&output);
    assert!(!all.contains(WRONG), "the secret leaked:\n{all}");
    assert!(!all.contains(CLIENT_SECRET), "the emulator's secret leaked:\n{all}");
    let line = all.lines().find(|l| l.contains("AADSTS7000215")).unwrap_or_else(|| panic!("no AADSTS line:\n{all}"));
    assert!(line.contains("trace_id"), "description and ids not on one line: {line}");
    assert!(line.contains("Check client_secret"), "{line}");
}

/// Starts a token endpoint that echoes the secret in a multi-line description,
/// which Azure AD does not do but a proxy or gateway might.
async fn echoing_token_endpoint(secret: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let mut buffer = vec![0u8; 16 * 1024];
                let _ = tokio::io::AsyncReadExt::read(&mut stream, &mut buffer).await;
                let body = format!(
                    r#"{{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret {secret} provided.\r\nTrace ID: t-1\r\nCorrelation ID: c-1","error_codes":[7000215],"trace_id":"t-1"}}"#
                );
                let response = format!(
                    "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echoed_secret_is_redacted_from_output() {
    const SECRET: &str = "Echo-Me-Secret-0123456789";
    let addr = echoing_token_endpoint(SECRET).await;
    let dir = tempfile::tempdir().unwrap();
    let lines = urls(&format!("http://{addr}")) + &secret_line(SECRET);
    let config = write_config(dir.path(), "", &tenant_with("contoso", &lines), &file_sink_toml("a", &dir.path().join("a")));

    let output = run_cli_env(&["run", "--once", "--config", config.to_str().unwrap()], &[("RUST_LOG", "debug")]).await;

    assert_eq!(output.status.code(), Some(1));
    let all = all_output(&output);
    assert!(!all.contains(SECRET), "the secret leaked:\n{all}");
    let line = all.lines().find(|l| l.contains("AADSTS7000215")).unwrap_or_else(|| panic!("no AADSTS line:\n{all}"));
    assert!(line.contains("[redacted]"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_password_stays_out_of_output() {
    const PASSWORD: &str = "Proxy-Pa55word-Value";
    let dir = tempfile::tempdir().unwrap();
    let proxy = format!("proxy_url = \"http://user:{PASSWORD}@{}\"", closed_addr());
    let lines = urls("http://127.0.0.1:9") + &secret_line(CLIENT_SECRET);
    let config = write_config(dir.path(), &proxy, &tenant_with("contoso", &lines), &file_sink_toml("a", &dir.path().join("a")));

    let output = run_cli_env(&["run", "--once", "--config", config.to_str().unwrap()], &[("RUST_LOG", "debug")]).await;

    assert_eq!(output.status.code(), Some(1));
    let all = all_output(&output);
    assert!(!all.contains(PASSWORD), "the proxy password leaked:\n{all}");
    assert!(!all.contains(CLIENT_SECRET), "the secret leaked:\n{all}");
}

// ---------------------------------------------------------------- token lifecycle

fn resolved_tenant(dir: &Path, emulator: &Emulator, extra: &str) -> Arc<ResolvedTenant> {
    let lines = urls(&emulator.url()) + &secret_line(CLIENT_SECRET) + extra;
    let config = write_config(dir, "", &tenant_with("contoso", &lines), &file_sink_toml("a", &dir.join("a")));
    let config = Config::load_with_env(&config, &[]).unwrap();
    Arc::new(config.resolve_tenants().unwrap().remove(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_callers_share_one_token_request() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let tokens = Arc::new(TokenSource::new(reqwest::Client::new(), resolved_tenant(dir.path(), &emulator, "")));

    let callers: Vec<_> = (0..32)
        .map(|_| {
            let tokens = tokens.clone();
            tokio::spawn(async move { tokens.token().await.unwrap().expose().to_string() })
        })
        .collect();
    let mut values = Vec::new();
    for caller in callers {
        values.push(caller.await.unwrap());
    }

    assert_eq!(emulator.token_requests(), 1);
    assert!(values.iter().all(|v| v == &values[0]));
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn token_is_refreshed_margin_before_expiry() {
    // The emulator issues tokens for 3599 s; a margin of 300 s refreshes at 3299 s.
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let tenant = resolved_tenant(dir.path(), &emulator, "token_refresh_margin_secs = 300\n");
    let tokens = TokenSource::new(reqwest::Client::new(), tenant);

    let first = tokens.token().await.unwrap();
    tokio::time::advance(Duration::from_secs(3290)).await;
    let before_margin = tokens.token().await.unwrap();
    assert_eq!(emulator.token_requests(), 1);
    assert_eq!(first, before_margin);

    tokio::time::advance(Duration::from_secs(20)).await;
    let after_margin = tokens.token().await.unwrap();
    assert_eq!(emulator.token_requests(), 2);
    assert_ne!(first, after_margin);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_rejections_back_off() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let lines = urls(&emulator.url()) + &secret_line("wrong-secret-for-backoff");
    let config = write_config(dir.path(), "", &tenant_with("contoso", &lines), &file_sink_toml("a", &dir.path().join("a")));
    let mut child = tokio::process::Command::new(binary())
        .args(["run", "--config", config.to_str().unwrap()])
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();

    // With interval_secs = 1, attempts without backoff would come at 0, 1,
    // 2, 3, 4 and 5 s; with doubling waits they come at 0, 2 and 6 s.
    tokio::time::sleep(Duration::from_millis(5500)).await;
    let requests = emulator.token_requests();
    let _ = child.start_kill();
    let output = child.wait_with_output().await.unwrap();

    assert!((2..=3).contains(&requests), "token requests in 5.5 s: {requests}");
    let err = stderr(&output);
    assert!(err.contains("credentials rejected 2 time(s) in a row"), "{err}");
    assert!(err.contains("next_attempt_secs=4"), "{err}");
}

// ---------------------------------------------------------------- query parameters

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_query_parameters_are_encoded() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let lines = urls(&emulator.url())
        + &secret_line(CLIENT_SECRET)
        + "machine_groups = [\"UK Servers\", \"Zürich & Genève\"]\n"
        + "device_created_machine_tags = \"vip tag\"\n"
        + "cloud_created_machine_tags = \"財務\"\n"
        + "limit = 7\n";
    let config = write_config(dir.path(), "", &tenant_with("contoso", &lines), &file_sink_toml("a", &dir.path().join("a")));

    assert_success(&run_once(&config).await);

    let request = &emulator.requests()[0];
    let values = |name: &str| -> Vec<String> {
        request.query.iter().filter(|(k, _)| k == name).map(|(_, v)| v.clone()).collect()
    };
    assert_eq!(values("machinegroups"), ["UK Servers", "Zürich & Genève"]);
    assert_eq!(values("DeviceCreatedMachineTags"), ["vip tag"]);
    assert_eq!(values("CloudCreatedMachineTags"), ["財務"]);
    assert_eq!(values("limit"), ["7"]);
}

// ---------------------------------------------------------------- HTTP behaviour

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_are_gzipped_and_user_agent_sent() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("a.jsonl");
    let config = write_config(dir.path(), "", &tenant_toml("contoso", TENANT_ID, &emulator), &file_sink_toml("archive", &archive));

    assert_success(&run_once(&config).await);

    let request = &emulator.requests()[0];
    assert!(request.gzip, "the response was not gzip-compressed");
    let expected = format!("mde-forwarder/{}", env!("CARGO_PKG_VERSION"));
    assert_eq!(request.user_agent.as_deref(), Some(expected.as_str()));
    assert_eq!(read_json_lines(&archive).len(), 46);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_response_is_cut_off_and_reported() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "max_response_bytes = 20000\nretry_max_attempts = 1",
        &tenant_toml("contoso", TENANT_ID, &emulator),
        &file_sink_toml("a", &dir.path().join("a")),
    );

    let output = run_once(&config).await;

    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("larger than 20000 bytes"), "{}", stderr(&output));
    let state = run_cli(&["state", "--config", config.to_str().unwrap(), "show"]).await;
    assert!(stdout(&state).contains("contoso: none"), "the checkpoint moved: {}", stdout(&state));
}

// ---------------------------------------------------------------- proxies and TLS

/// An HTTP proxy on 127.0.0.1 that sends every tunnel (CONNECT) to
/// `tunnel_to` and every absolute-form request to `forward_to`, whatever
/// host the client named, and records the request targets.
struct TestProxy {
    addr: SocketAddr,
    connects: Arc<AtomicUsize>,
    forwarded: Arc<AtomicUsize>,
    targets: Arc<Mutex<Vec<String>>>,
}

impl TestProxy {
    async fn start(forward_to: SocketAddr, tunnel_to: Option<SocketAddr>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = TestProxy {
            addr: listener.local_addr().unwrap(),
            connects: Arc::default(),
            forwarded: Arc::default(),
            targets: Arc::default(),
        };
        let (connects, forwarded, targets) = (proxy.connects.clone(), proxy.forwarded.clone(), proxy.targets.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let (connects, forwarded, targets) = (connects.clone(), forwarded.clone(), targets.clone());
                tokio::spawn(async move {
                    let mut reader = BufReader::new(stream);
                    let mut head = String::new();
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        head.push_str(&line);
                        if line == "\r\n" {
                            break;
                        }
                    }
                    let request_line = head.lines().next().unwrap_or_default().to_string();
                    let mut parts = request_line.split(' ');
                    let method = parts.next().unwrap_or_default();
                    targets.lock().unwrap().push(parts.next().unwrap_or_default().to_string());
                    let leftover = reader.buffer().to_vec();
                    let mut client = reader.into_inner();
                    if method == "CONNECT" {
                        connects.fetch_add(1, Ordering::SeqCst);
                        let Some(tunnel_to) = tunnel_to else { return };
                        let mut upstream = TcpStream::connect(tunnel_to).await.unwrap();
                        client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n").await.unwrap();
                        upstream.write_all(&leftover).await.unwrap();
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                    } else {
                        forwarded.fetch_add(1, Ordering::SeqCst);
                        let mut upstream = TcpStream::connect(forward_to).await.unwrap();
                        upstream.write_all(head.as_bytes()).await.unwrap();
                        upstream.write_all(&leftover).await.unwrap();
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                    }
                });
            }
        });
        proxy
    }

    fn targets(&self) -> Vec<String> {
        self.targets.lock().unwrap().clone()
    }
}

/// Starts a TLS front on 127.0.0.1 with the test server certificate, passing
/// plain HTTP on to `upstream`.
async fn tls_front(upstream: SocketAddr) -> SocketAddr {
    use tokio_rustls::rustls;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let certs = vec![CertificateDer::from_pem_file(data("tls-server-cert.pem")).unwrap()];
    let key = PrivateKeyDer::from_pem_file(data("tls-server-key.pem")).unwrap();
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(stream).await else { return };
                let mut plain = TcpStream::connect(upstream).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_proxy_forwards_absolute_form_requests() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let proxy = TestProxy::start(emulator.addr(), None).await;
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens at the configured address: only the proxy reaches the emulator.
    let unreachable = format!("http://{}", closed_addr());
    let archive = dir.path().join("a.jsonl");
    let lines = urls(&unreachable) + &secret_line(CLIENT_SECRET);
    let poll = format!("proxy_url = \"http://{}\"", proxy.addr);
    let config = write_config(dir.path(), &poll, &tenant_with("contoso", &lines), &file_sink_toml("archive", &archive));

    assert_success(&run_once(&config).await);

    assert_eq!(read_json_lines(&archive).len(), 46);
    assert!(proxy.forwarded.load(Ordering::SeqCst) >= 1);
    assert_eq!(proxy.connects.load(Ordering::SeqCst), 0);
    assert!(proxy.targets().iter().all(|t| t.starts_with(&format!("{unreachable}/"))), "{:?}", proxy.targets());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_through_connect_proxy_with_ca_file() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    emulator.add_client_certificate(TENANT_ID, &std::fs::read(data("client-cert.pem")).unwrap()).unwrap();
    let front = tls_front(emulator.addr()).await;
    let proxy = TestProxy::start(emulator.addr(), Some(front)).await;
    let dir = tempfile::tempdir().unwrap();
    let unreachable = unused_local_addr();
    let archive = dir.path().join("a.jsonl");
    let lines = urls(&format!("https://{unreachable}")) + &certificate_lines();
    let poll = format!("proxy_url = \"http://{}\"\nca_file = \"{}\"", proxy.addr, data("tls-ca.pem").display());
    let config = write_config(dir.path(), &poll, &tenant_with("contoso", &lines), &file_sink_toml("archive", &archive));

    assert_success(&run_once(&config).await);

    assert_eq!(read_json_lines(&archive).len(), 46);
    assert!(proxy.connects.load(Ordering::SeqCst) >= 1);
    assert_eq!(proxy.forwarded.load(Ordering::SeqCst), 0);
    assert!(proxy.targets().iter().all(|t| t == &unreachable.to_string()), "{:?}", proxy.targets());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_without_ca_file_fails_verification() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let front = tls_front(emulator.addr()).await;
    let dir = tempfile::tempdir().unwrap();
    let lines = urls(&format!("https://{front}")) + &secret_line(CLIENT_SECRET);
    let config = write_config(dir.path(), "", &tenant_with("contoso", &lines), &file_sink_toml("a", &dir.path().join("a")));

    let output = run_once(&config).await;

    assert_eq!(output.status.code(), Some(1));
    assert_eq!(emulator.token_requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_proxy_environment_variable_is_used() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let front = tls_front(emulator.addr()).await;
    let proxy = TestProxy::start(emulator.addr(), Some(front)).await;
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("a.jsonl");
    let lines = urls(&format!("https://{}", unused_local_addr())) + &secret_line(CLIENT_SECRET);
    let poll = format!("ca_file = \"{}\"", data("tls-ca.pem").display());
    let config = write_config(dir.path(), &poll, &tenant_with("contoso", &lines), &file_sink_toml("archive", &archive));
    let proxy_url = format!("http://{}", proxy.addr);

    let env = [("HTTPS_PROXY", proxy_url.as_str()), ("NO_PROXY", ""), ("no_proxy", "")];
    let output = run_cli_env(&["run", "--once", "--config", config.to_str().unwrap()], &env).await;

    assert_success(&output);
    assert_eq!(read_json_lines(&archive).len(), 46);
    assert!(proxy.connects.load(Ordering::SeqCst) >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_proxy_environment_variable_bypasses_proxy() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let proxy = TestProxy::start(emulator.addr(), None).await;
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("a.jsonl");
    let config = write_config(dir.path(), "", &tenant_toml("contoso", TENANT_ID, &emulator), &file_sink_toml("archive", &archive));
    let proxy_url = format!("http://{}", proxy.addr);

    let env = [("HTTP_PROXY", proxy_url.as_str()), ("NO_PROXY", "127.0.0.1")];
    let output = run_cli_env(&["run", "--once", "--config", config.to_str().unwrap()], &env).await;

    assert_success(&output);
    assert_eq!(read_json_lines(&archive).len(), 46);
    assert_eq!(proxy.forwarded.load(Ordering::SeqCst) + proxy.connects.load(Ordering::SeqCst), 0);
}

/// A token or API request whose proxy refuses the connection names the
/// proxy, without its credentials, so the operator checks the proxy and not
/// Azure AD or the API. The proxy comes from `[poll] proxy_url` or from the
/// environment, and `no_proxy` or `NO_PROXY` sends the token request direct.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_api_proxy_is_named() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let closed = closed_addr();
    let proxy_url = format!("http://proxy-user:proxy-pass-987@{closed}");
    let poll_proxy = format!("proxy_url = \"{proxy_url}\"");
    let poll_proxy_no_login = format!("{poll_proxy}\nno_proxy = \"127.0.0.1\"");
    let env_proxy = |[upper, lower]: [&'static str; 2], no_proxy: &str| {
        vec![(upper, proxy_url.clone()), (lower, proxy_url.clone()), ("NO_PROXY", no_proxy.to_string()), ("no_proxy", no_proxy.to_string())]
    };
    let configured = format!("through proxy http://redacted:redacted@{closed}/");
    // hyper-util's matcher moves the user and password of an environment
    // proxy into a Basic authentication header, so the URL has none.
    let from_env = format!("through proxy http://{closed}/");
    // The token request goes direct to 127.0.0.1, which no_proxy exempts,
    // and the API request goes through the proxy to localhost.
    let api_lines = format!("api_url = \"{}\"\nlogin_url = \"{}\"\n", emulator.url().replace("127.0.0.1", "localhost"), emulator.url());
    let token_lines = urls(&emulator.url());
    let cases = [
        ("token, [poll] proxy_url", poll_proxy.as_str(), token_lines.as_str(), vec![], &configured, "token request"),
        ("token, HTTP_PROXY", "", token_lines.as_str(), env_proxy(["HTTP_PROXY", "http_proxy"], ""), &from_env, "token request"),
        ("token, ALL_PROXY", "", token_lines.as_str(), env_proxy(["ALL_PROXY", "all_proxy"], ""), &from_env, "token request"),
        ("API, [poll] proxy_url", poll_proxy_no_login.as_str(), api_lines.as_str(), vec![], &configured, "/api/alerts"),
        ("API, HTTP_PROXY", "", api_lines.as_str(), env_proxy(["HTTP_PROXY", "http_proxy"], "127.0.0.1"), &from_env, "/api/alerts"),
    ];
    for (name, poll, lines, env, expected_proxy, expected_request) in cases {
        let dir = tempfile::tempdir().unwrap();
        let tenant = tenant_with("contoso", &(lines.to_string() + &secret_line(CLIENT_SECRET)));
        let config = write_config(dir.path(), poll, &tenant, &file_sink_toml("archive", &dir.path().join("a.jsonl")));
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();

        let output = run_cli_env(&["run", "--once", "--config", config.to_str().unwrap()], &env).await;

        let log = all_output(&output);
        assert!(!output.status.success(), "{name}: {log}");
        assert!(log.contains(expected_request), "{name}: the failed request is named: {log}");
        assert!(log.contains(expected_proxy.as_str()), "{name}: the proxy is named: {log}");
        assert!(log.contains("Connection refused"), "{name}: {log}");
        assert!(log.contains("check that it is running"), "{name}: the advice is given: {log}");
        assert!(!log.contains("proxy-pass-987"), "{name}: the proxy password stays out of the log: {log}");
        assert!(!log.contains("proxy-user"), "{name}: the proxy user stays out of the log: {log}");
    }

    let dir = tempfile::tempdir().unwrap();
    let tenant = tenant_with("contoso", &(token_lines.clone() + &secret_line(CLIENT_SECRET)));
    let config = write_config(dir.path(), &poll_proxy, &tenant, &file_sink_toml("archive", &dir.path().join("a.jsonl")));
    let probe = run_cli(&["check-config", "--probe", "--config", config.to_str().unwrap()]).await;
    let text = all_output(&probe);
    assert!(!probe.status.success(), "{text}");
    assert!(text.contains(&configured), "the probe names the proxy: {text}");
    assert!(!text.contains("proxy-pass-987"), "the probe hides the proxy password: {text}");
}

// ---------------------------------------------------------------- pull

fn pull_args<'a>(config: &'a str, output: &'a str, window: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["pull", "--config", config, "--tenant", "contoso", "--output", output];
    args.extend_from_slice(window);
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_writes_every_detection_and_keeps_state() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "limit = 10", &tenant_toml("contoso", TENANT_ID, &emulator), &file_sink_toml("a", &dir.path().join("a")));
    let config_text = config.to_str().unwrap();
    let state_before = stdout(&run_cli(&["state", "--config", config_text, "show"]).await);
    let out = dir.path().join("pulled.jsonl");
    let since = mde_forwarder::timefmt::format_query(chrono::Utc::now() - chrono::Duration::days(1));

    let output = run_cli(&pull_args(config_text, out.to_str().unwrap(), &["--since", &since])).await;

    assert_success(&output);
    let pulled = read_json_lines(&out);
    let mut ids = full_ids(&pulled);
    ids.sort();
    let mut expected = sample_full_ids();
    expected.sort();
    assert_eq!(ids, expected);
    assert!(emulator.requests().len() >= 5, "limit 10 needs at least 5 pages for 46 detections");
    let state_after = stdout(&run_cli(&["state", "--config", config_text, "show"]).await);
    assert_eq!(state_before, state_after);
    assert!(state_after.contains("contoso: none"), "{state_after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_keeps_raw_text_and_honours_until() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let raw = r#"{"FullId":"raw:1","LastProcessedTimeUtc":"2020-01-01T00:00:00.1234567Z","Number":1.50,"Text":"a\u00e9"}"#;
    emulator.push_detection(TENANT_ID, serde_json::from_str(raw).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "", &tenant_toml("contoso", TENANT_ID, &emulator), &file_sink_toml("a", &dir.path().join("a")));
    let out = dir.path().join("pulled.jsonl");
    let window = ["--since", "2019-12-31T00:00:00Z", "--until", "2020-01-02T00:00:00Z"];

    let output = run_cli(&pull_args(config.to_str().unwrap(), out.to_str().unwrap(), &window)).await;

    assert_success(&output);
    let text = std::fs::read_to_string(&out).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "{text}");
    let pulled: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(pulled["FullId"], "raw:1");
    let request = &emulator.requests()[0];
    assert!(request.query.iter().any(|(k, v)| k == "untilTimeUtc" && v.starts_with("2020-01-02T00:00:00")), "{:?}", request.query);
}


/// Elements that are not detections may hold line breaks that are data.
/// Each becomes one line that gives back its exact text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_keeps_invalid_elements_exact() {
    let time = now_text();
    let detection = format!("{{\r\n\"FullId\":\"ok:1\",\n\"LastProcessedTimeUtc\":\"{time}\",\"T\":\"a\\nb\"}}");
    let invalid = [
        format!("{{\"FullId\":\"raw:1\",\"LastProcessedTimeUtc\":\"{time}\",\"Cmd\":\"line1\r\nline2\"}}"),
        "\"lone\nstring\"".to_string(),
        "[1,\r\n2]".to_string(),
        "42".to_string(),
    ];
    let body = format!("[{detection},{}]", invalid.join(","));
    let (_api, tenant) = api_answering(body).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "", &tenant, &file_sink_toml("a", &dir.path().join("a")));
    let out = dir.path().join("pulled.jsonl");

    let output = run_cli(&pull_args(config.to_str().unwrap(), out.to_str().unwrap(), &["--ago", "P1D"])).await;

    assert_success(&output);
    let text = std::fs::read_to_string(&out).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 5, "{text}");
    assert_eq!(lines[0], detection.replace(['\r', '\n'], " "), "a detection keeps its bytes but for whitespace");
    for (line, element) in lines[1..].iter().zip(&invalid) {
        let wrapped: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(wrapped, serde_json::json!(["utf-8", element]), "{line}");
    }
    let log = stderr(&output);
    assert!(log.contains("invalid=4"), "{log}");
    assert!(log.contains("WARN"), "{log}");
    assert!(log.contains("not detections"), "{log}");
}

/// Runs `run --once` against an API that responds with `body`, which has
/// elements that are not detections, with a JSON file sink. Checks that
/// the run finished with exit code 3, which reports new dead letters.
/// Returns the state's directory (with `config.toml`), the output and the
/// forwarded FullIds.
async fn run_once_serving(body: String) -> (tempfile::TempDir, std::process::Output, Vec<String>) {
    let (_api, tenant) = api_answering(body).await;
    let dir = tempfile::tempdir().unwrap();
    let sink_file = dir.path().join("a");
    let config = write_config(dir.path(), "", &tenant, &file_sink_toml("a", &sink_file));

    let output = run_cli(&["run", "--once", "--config", config.to_str().unwrap()]).await;

    assert_dead_letters_stored(&output);
    let forwarded = read_json_lines(&sink_file).iter().map(|d| d["FullId"].as_str().unwrap().to_string()).collect();
    (dir, output, forwarded)
}

/// An element whose brackets do not match is set aside as a dead letter,
/// and the elements after it are forwarded, instead of the whole response
/// being read as cut short and retried forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mismatched_bracket_element_is_set_aside() {
    let time = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.6fZ");
    let detection = |id: &str, x: &str| format!(r#"{{"FullId": "{id}", "LastProcessedTimeUtc": "{time}", "X": {x}}}"#);
    let broken = format!(r#"{{"FullId": "r2", "LastProcessedTimeUtc": "{time}", "X": [1, 2}}"#);
    let body = format!("[{},\n{broken},\n{}]", detection("r1", "\"ok\""), detection("r3", "\"ok\""));
    let (dir, output, forwarded) = run_once_serving(body).await;
    let config = dir.path().join("config.toml");
    let cfg = config.to_str().unwrap();

    assert_eq!(forwarded, ["r1", "r3"], "{}", stderr(&output));
    let listing = run_cli(&["state", "--config", cfg, "dead-letters"]).await;
    assert_success(&listing);
    let rows: Vec<String> = stdout(&listing).lines().skip(1).map(str::to_string).collect();
    assert_eq!(rows.len(), 1, "one dead letter: {rows:?}");
    let id = rows[0].split_whitespace().next().unwrap().to_string();
    let letter = run_cli(&["state", "--config", cfg, "dead-letters", "--id", &id, "--raw"]).await;
    assert_success(&letter);
    assert_eq!(stdout(&letter), broken, "the dead letter keeps the element exactly");
}

/// A stray closing bracket between elements becomes a dead letter of its
/// own, and the detections around it are forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stray_closing_brackets_are_set_aside() {
    let time = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.6fZ");
    let detection = |id: &str| format!(r#"{{"FullId":"{id}","LastProcessedTimeUtc":"{time}"}}"#);
    let strays = [
        r#"{"FullId":"b","X":[1]]}"#.to_string(),
        r#"{"a":[1}}"#.to_string(),
        format!("{}}}", detection("b")),
        format!("{}]", detection("b")),
        "]".to_string(),
        r#"{"FullId":"b",]"a":1}"#.to_string(),
    ];
    for stray in strays {
        let body = format!("[{},{stray},{}]", detection("v1"), detection("v2"));
        let (dir, _output, forwarded) = run_once_serving(body).await;
        assert!(forwarded.contains(&"v1".to_string()), "{stray}: {forwarded:?}");
        assert!(forwarded.contains(&"v2".to_string()), "{stray}: {forwarded:?}");
        assert!(!dead_letters(dir.path()).is_empty(), "{stray}: the broken part is a dead letter");
    }
}

/// An unclosed bracket can make a broken element take in the detection
/// after it. That detection is not lost silently: the dead letter's reason
/// and an ERROR name its FullId.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swallowed_detection_is_named() {
    let time = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.6fZ");
    let detection = |id: &str| format!(r#"{{"FullId":"{id}","LastProcessedTimeUtc":"{time}"}}"#);
    let body = format!(r#"[{},{{"FullId":"r2","X":[1,2,{},{{"b":1}}}},{}]"#, detection("v1"), detection("v2"), detection("v3"));
    let (dir, output, forwarded) = run_once_serving(body).await;

    assert_eq!(forwarded, ["v1", "v3"]);
    let log = stderr(&output);
    assert!(log.contains("ERROR"), "{log}");
    assert!(log.contains("r2, v2"), "{log}");
    let letters = dead_letters(dir.path());
    assert_eq!(letters.len(), 1);
    assert!(letters[0].reason.contains("its text contains FullId r2, v2"), "{}", letters[0].reason);
}

/// SIGTERM during a pull with `--output` leaves the earlier export and no
/// partial file. The API accepts connections and never responds, so the
/// pull is still waiting when the signal comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_stopped_by_signal_leaves_no_partial_file() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = format!("http://{}", silent.local_addr().unwrap());
    let accepting = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            open.push(socket);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let tenant = tenant_with("contoso", &(secret_line(CLIENT_SECRET) + &urls(&api)));
    let config = write_config(dir.path(), "", &tenant, &file_sink_toml("a", &dir.path().join("a")));
    let exports = dir.path().join("exports");
    std::fs::create_dir(&exports).unwrap();
    let out = exports.join("day.jsonl");
    std::fs::write(&out, "earlier\n").unwrap();

    let child = tokio::process::Command::new(binary())
        .args(pull_args(config.to_str().unwrap(), out.to_str().unwrap(), &["--ago", "P1D"]))
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while hidden_files(&exports).is_empty() && started.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(hidden_files(&exports).len(), 1, "the pull writes a partial file");
    // SAFETY: sends SIGTERM to our own child process.
    unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGTERM) };
    let output = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output()).await.expect("pull stops on SIGTERM").unwrap();

    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("stopped by a signal"), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "earlier\n");
    assert_eq!(hidden_files(&exports), Vec::<String>::new(), "the partial file is deleted");
    accepting.abort();
}

/// Returns the names in `dir` that start with `.` (partial pull outputs).
fn hidden_files(dir: &Path) -> Vec<String> {
    let names = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned());
    names.filter(|name| name.starts_with('.')).collect()
}

/// A pull that fails leaves an earlier export as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_pull_keeps_earlier_output() {
    let dir = tempfile::tempdir().unwrap();
    let api = format!("http://{}", closed_addr());
    let tenant = tenant_with("contoso", &(secret_line(CLIENT_SECRET) + &urls(&api)));
    let config = write_config(dir.path(), "", &tenant, &file_sink_toml("a", &dir.path().join("a")));
    let exports = dir.path().join("exports");
    std::fs::create_dir(&exports).unwrap();
    let out = exports.join("day.jsonl");
    std::fs::write(&out, "{\"FullId\":\"earlier\"}\n").unwrap();

    let output = run_cli(&pull_args(config.to_str().unwrap(), out.to_str().unwrap(), &["--ago", "P1D"])).await;

    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(stderr(&output).contains(&format!("{} is unchanged", out.display())), "{}", stderr(&output));
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "{\"FullId\":\"earlier\"}\n");
    assert_eq!(hidden_files(&exports), Vec::<String>::new(), "no partial file is left");
}

/// A successful pull replaces the file and keeps its mode, and writes
/// through a symbolic link instead of replacing the link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_replaces_output_keeping_mode() {
    use std::os::unix::fs::PermissionsExt;

    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "", &tenant_toml("contoso", TENANT_ID, &emulator), &file_sink_toml("a", &dir.path().join("a")));
    let exports = dir.path().join("exports");
    std::fs::create_dir(&exports).unwrap();
    let out = exports.join("day.jsonl");
    std::fs::write(&out, "earlier\n").unwrap();
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o640)).unwrap();
    let link = exports.join("latest.jsonl");
    std::os::unix::fs::symlink(&out, &link).unwrap();
    let config = config.to_str().unwrap();

    let direct = run_cli(&pull_args(config, out.to_str().unwrap(), &["--ago", "P1D"])).await;

    assert_success(&direct);
    assert_eq!(read_json_lines(&out).len(), 46);
    assert_eq!(std::fs::metadata(&out).unwrap().permissions().mode() & 0o777, 0o640);
    assert_eq!(hidden_files(&exports), Vec::<String>::new(), "no partial file is left");

    std::fs::write(&out, "earlier\n").unwrap();
    let linked = run_cli(&pull_args(config, link.to_str().unwrap(), &["--ago", "P1D"])).await;

    assert_success(&linked);
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink(), "the link stays a link");
    assert_eq!(read_json_lines(&out).len(), 46);

    // A file with a second hard link is written in place, so both names
    // keep showing the same file.
    std::fs::write(&out, "earlier\n").unwrap();
    let second_name = exports.join("copy.jsonl");
    std::fs::hard_link(&out, &second_name).unwrap();
    let hard_linked = run_cli(&pull_args(config, out.to_str().unwrap(), &["--ago", "P1D"])).await;

    assert_success(&hard_linked);
    assert_eq!(read_json_lines(&second_name).len(), 46, "the other name sees the new export");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_runs_while_daemon_holds_state() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "", &tenant_toml("contoso", TENANT_ID, &emulator), &file_sink_toml("a", &dir.path().join("a")));
    let mut daemon = tokio::process::Command::new(binary())
        .args(["run", "--config", config.to_str().unwrap()])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    assert!(wait_until(Duration::from_secs(10), || !emulator.requests().is_empty()).await, "the daemon did not poll");

    let output = run_cli(&["pull", "--config", config.to_str().unwrap(), "--tenant", "contoso", "--ago", "P1D"]).await;
    let _ = daemon.kill().await;

    assert_success(&output);
    assert_eq!(stdout(&output).lines().count(), 46);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_rejects_unknown_tenant_and_bad_times() {
    let emulator = emulator_with_samples(EmulatorOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "", &tenant_toml("contoso", TENANT_ID, &emulator), &file_sink_toml("a", &dir.path().join("a")));
    let config = config.to_str().unwrap();

    let unknown = run_cli(&["pull", "--config", config, "--tenant", "nobody", "--ago", "PT1H"]).await;
    assert_eq!(unknown.status.code(), Some(1));
    assert!(stderr(&unknown).contains("no tenant named \"nobody\""), "{}", stderr(&unknown));

    let bad_ago = run_cli(&["pull", "--config", config, "--tenant", "contoso", "--ago", "4 hours"]).await;
    assert_eq!(bad_ago.status.code(), Some(2));
    assert!(stderr(&bad_ago).contains("invalid --ago"), "{}", stderr(&bad_ago));

    let both = run_cli(&["pull", "--config", config, "--tenant", "contoso", "--ago", "PT1H", "--until", "2026-01-01T00:00:00Z"]).await;
    assert_eq!(both.status.code(), Some(2));
    assert!(emulator.requests().is_empty());
}

/// `run --once` exits 3 when the run stores new dead letters, and 0 when
/// a later run stores none, so a cron job can tell the two apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_exit_code_reports_new_dead_letters() {
    let body = r#"[{"FullId":"good:1","LastProcessedTimeUtc":"2026-01-01T00:00:00Z"}, 42, "text"]"#.to_string();
    let (_api, tenant) = api_answering(body).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "", &tenant, &file_sink_toml("a", &dir.path().join("a")));

    let first = run_once(&config).await;
    assert_dead_letters_stored(&first);
    assert!(stderr(&first).contains("warning: this run stored 2 dead letters"), "{}", stderr(&first));

    // The same elements again are remembered, so nothing new is stored.
    let second = run_once(&config).await;
    assert_success(&second);
    assert!(!stderr(&second).contains("dead letter"), "{}", stderr(&second));
}

/// A `run --once` that fails still names the dead letters it stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_once_run_names_its_dead_letters() {
    let body = r#"[{"FullId":"good:1","LastProcessedTimeUtc":"2026-01-01T00:00:00Z"}, 42]"#.to_string();
    let (_api, tenant) = api_answering(body).await;
    let dir = tempfile::tempdir().unwrap();
    let closed = closed_addr();
    let config = write_config(dir.path(), "", &tenant, &tcp_sink_toml("siem", closed));

    let output = run_once(&config).await;

    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(stderr(&output).contains("the run also stored 1 dead letter (list them with `state dead-letters`)"), "{}", stderr(&output));
}

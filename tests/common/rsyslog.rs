//! A real rsyslogd on 127.0.0.1 for the syslog sinks: UDP, TCP and TLS
//! listeners, CEF parsed back by mmnormalize (liblognorm), and every
//! message written to a file as rsyslog's JSON view of it.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

/// How rsyslog checks TLS clients.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// Server certificate only.
    None,
    /// The client must present a certificate signed by the test CA.
    Required,
}

/// Certificates made with the `openssl` CLI: a CA, a server certificate
/// for `localhost` and 127.0.0.1, and a client certificate.
pub struct TestCerts {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl TestCerts {
    pub fn create(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let path = |name: &str| dir.join(name);
        openssl(&["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=mde-forwarder test CA"], &[
            ("-keyout", &path("ca.key")),
            ("-out", &path("ca.pem")),
        ]);
        let extensions = path("ext.cnf");
        std::fs::write(
            &extensions,
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n",
        )
        .unwrap();
        for name in ["server", "client"] {
            openssl(&["req", "-newkey", "rsa:2048", "-nodes", "-subj", &format!("/CN={name}")], &[
                ("-keyout", &path(&format!("{name}.key"))),
                ("-out", &path(&format!("{name}.csr"))),
            ]);
            openssl(&["x509", "-req", "-days", "2", "-CAcreateserial"], &[
                ("-in", &path(&format!("{name}.csr"))),
                ("-CA", &path("ca.pem")),
                ("-CAkey", &path("ca.key")),
                ("-out", &path(&format!("{name}.pem"))),
                ("-extfile", &extensions),
            ]);
        }
        Self {
            ca: path("ca.pem"),
            server_cert: path("server.pem"),
            server_key: path("server.key"),
            client_cert: path("client.pem"),
            client_key: path("client.key"),
        }
    }
}

fn openssl(args: &[&str], paths: &[(&str, &Path)]) {
    let mut command = Command::new("openssl");
    command.args(args);
    for (flag, path) in paths {
        command.arg(flag).arg(path);
    }
    let output = command.output().expect("openssl CLI is installed");
    assert!(output.status.success(), "openssl {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
}

/// A running rsyslogd, stopped when dropped.
pub struct Rsyslog {
    pub udp: SocketAddr,
    pub tcp: SocketAddr,
    pub tls: Option<SocketAddr>,
    output: PathBuf,
    child: Child,
}

impl Rsyslog {
    /// Starts rsyslogd with a UDP and a TCP listener, and a TLS listener
    /// when `tls` is given.
    pub fn start(dir: &Path, tls: Option<(&TestCerts, ClientAuth)>) -> Self {
        // A port is picked by binding port 0 and closing, then rsyslogd binds
        // it. Starting one rsyslogd at a time keeps parallel tests from
        // picking the same free port in between.
        static STARTING: Mutex<()> = Mutex::new(());
        let _one_at_a_time = STARTING.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let dir = dir.join("rsyslog");
        std::fs::create_dir_all(dir.join("work")).unwrap();
        let udp = free_udp_port();
        let tcp = free_tcp_port();
        let tls_port = tls.map(|_| free_tcp_port());
        let rulebase = dir.join("cef.rulebase");
        // RFC 3164 leaves the space after the tag at the start of the message
        // text, hence the second rule.
        std::fs::write(&rulebase, "version=2\nrule=:%cef:cef%\nrule=: %cef:cef%\n").unwrap();
        let output = dir.join("received.jsonl");

        let mut global = format!("workDirectory=\"{}\"", dir.join("work").display());
        let mut tls_input = String::new();
        if let (Some((certs, auth)), Some(port)) = (tls, tls_port) {
            global.push_str(&format!(
                " DefaultNetstreamDriverCAFile=\"{}\" DefaultNetstreamDriverCertFile=\"{}\" DefaultNetstreamDriverKeyFile=\"{}\"",
                certs.ca.display(),
                certs.server_cert.display(),
                certs.server_key.display()
            ));
            let auth_mode = match auth {
                ClientAuth::None => "anon",
                ClientAuth::Required => "x509/certvalid",
            };
            tls_input = format!(
                "input(type=\"imtcp\" address=\"127.0.0.1\" port=\"{}\" streamDriver.name=\"gtls\" streamDriver.mode=\"1\" streamDriver.authMode=\"{auth_mode}\")\n",
                port.port()
            );
        }
        let config = format!(
            r#"global({global})
module(load="imudp")
module(load="imtcp")
module(load="mmnormalize")
input(type="imudp" address="127.0.0.1" port="{udp_port}")
input(type="imtcp" address="127.0.0.1" port="{tcp_port}")
{tls_input}
template(name="jsonview" type="string" string="%jsonmesg%\n")
action(type="mmnormalize" rulebase="{rulebase}")
action(type="omfile" file="{output}" template="jsonview")
"#,
            udp_port = udp.port(),
            tcp_port = tcp.port(),
            rulebase = rulebase.display(),
            output = output.display(),
        );
        let config_path = dir.join("rsyslog.conf");
        std::fs::write(&config_path, config).unwrap();
        let child = Command::new("rsyslogd")
            .arg("-n")
            .arg("-f")
            .arg(&config_path)
            .arg("-i")
            .arg(dir.join("rsyslogd.pid"))
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(dir.join("rsyslogd.log")).unwrap()))
            .spawn()
            .expect("rsyslogd is installed");
        let rsyslog = Self { udp, tcp, tls: tls_port, output, child };
        rsyslog.wait_listening(&dir);
        rsyslog
    }

    fn wait_listening(&self, dir: &Path) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let ports: Vec<SocketAddr> = std::iter::once(self.tcp).chain(self.tls).collect();
        while Instant::now() < deadline {
            let tcp_ready = ports.iter().all(|p| TcpStream::connect(p).is_ok());
            // The UDP port is taken once rsyslogd has bound it.
            let udp_ready = UdpSocket::bind(self.udp).is_err();
            if tcp_ready && udp_ready {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let log = std::fs::read_to_string(dir.join("rsyslogd.log")).unwrap_or_default();
        panic!("rsyslogd did not start listening:\n{log}");
    }

    /// What rsyslog received, one JSON object per message. A last line
    /// without its line feed is still being written and is left out.
    pub fn received(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(&self.output).unwrap_or_default();
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        complete.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad rsyslog line {l}: {e}"))).collect()
    }

    /// Waits until `count` messages arrived (rsyslog writes asynchronously).
    pub fn wait_for(&self, count: usize, limit: Duration) -> Vec<Value> {
        let deadline = Instant::now() + limit;
        loop {
            let received = self.received();
            if received.len() >= count || Instant::now() >= deadline {
                return received;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_tcp_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

fn free_udp_port() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

//! rustls client settings for the TLS syslog, HTTP and HEC sinks, built
//! once at start from PEM files, with the ring crypto provider only.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::sign::CertifiedKey;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::config::{ConfigError, TlsConfig};

/// A client certificate chain and its key, both PEM files.
pub struct ClientIdentity<'a> {
    pub cert_file: &'a Path,
    pub key_file: &'a Path,
}

/// Hands the receiver the sink's client certificate, if the sink has one,
/// and counts the handshakes in which the receiver requested it.
///
/// In TLS 1.3 a receiver checks the client's certificate (or its absence)
/// only after the client's handshake is complete. A sink that wrote its
/// batch at once would see it acknowledged by TCP and then discarded with
/// the session, so the sink waits for the receiver's verdict before writing
/// when the count grew.
#[derive(Debug, Default)]
pub struct SinkCertificate {
    key: Option<Arc<CertifiedKey>>,
    requests: AtomicU64,
    /// The receiver once accepted a session without a certificate, which
    /// is then logged no more.
    accepted_without: AtomicBool,
}

impl SinkCertificate {
    /// Handshakes so far in which the receiver requested a certificate.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// True when the sink has a certificate to send.
    pub fn present(&self) -> bool {
        self.key.is_some()
    }

    pub fn accepted_without(&self) -> bool {
        self.accepted_without.load(Ordering::Relaxed)
    }

    pub fn set_accepted_without(&self) {
        self.accepted_without.store(true, Ordering::Relaxed);
    }
}

impl ResolvesClientCert for SinkCertificate {
    fn resolve(&self, _root_hint_subjects: &[&[u8]], _sigschemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.key.clone()
    }

    fn has_certs(&self) -> bool {
        self.key.is_some()
    }
}

/// Builds the TLS client settings of the sink at config position `key`.
pub fn client_config(key: &str, tls: &TlsConfig, identity: Option<ClientIdentity<'_>>) -> Result<Arc<ClientConfig>, ConfigError> {
    client_config_watching(key, tls, identity).map(|(config, _)| config)
}

/// Builds the settings as [`client_config`] does, and returns the client
/// certificate's resolver, which counts the receiver's requests for it.
pub fn client_config_watching(
    key: &str,
    tls: &TlsConfig,
    identity: Option<ClientIdentity<'_>>,
) -> Result<(Arc<ClientConfig>, Arc<SinkCertificate>), ConfigError> {
    // rustls 0.23.48 marks the ring provider deprecated because it has no
    // post-quantum key exchange. This build keeps ring, which reqwest here
    // already uses, so that aws-lc and its C toolchain are not needed.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(key, "tls_ca_file", format!("cannot set up TLS: {e}")))?;
    let builder = if tls.tls_insecure_skip_verify {
        builder.dangerous().with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate { provider }))
    } else {
        builder.with_root_certificates(root_store(key, tls.tls_ca_file.as_deref())?)
    };
    let key = match identity {
        Some(identity) => {
            let chain = read_certificates(key, "tls_cert_file", identity.cert_file)?;
            let private_key = PrivateKeyDer::from_pem_file(identity.key_file).map_err(|e| {
                invalid(key, "tls_key_file", format!("cannot read a PEM private key from {}: {e}", identity.key_file.display()))
            })?;
            let certified = CertifiedKey::from_der(chain, private_key, builder.crypto_provider())
                .map_err(|e| invalid(key, "tls_key_file", format!("does not match tls_cert_file: {e}")))?;
            Some(Arc::new(certified))
        }
        None => None,
    };
    let certificate = Arc::new(SinkCertificate { key, ..SinkCertificate::default() });
    let mut config = builder.with_client_cert_resolver(certificate.clone());
    // A resumed TLS 1.3 session has no certificate request, so the sink
    // could not tell that a receiver now requires a certificate, or no
    // longer trusts this one.
    config.resumption = rustls::client::Resumption::disabled();
    Ok((Arc::new(config), certificate))
}

fn root_store(key: &str, ca_file: Option<&Path>) -> Result<RootCertStore, ConfigError> {
    let mut roots = RootCertStore::empty();
    let Some(path) = ca_file else {
        return Err(invalid(key, "tls_ca_file", "missing: set the PEM file of the CA that signed the receiver's certificate"));
    };
    for certificate in read_certificates(key, "tls_ca_file", path)? {
        roots
            .add(certificate)
            .map_err(|e| invalid(key, "tls_ca_file", format!("{} contains an unusable CA certificate: {e}", path.display())))?;
    }
    Ok(roots)
}

fn read_certificates(key: &str, field: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let read_error = |e: rustls_pki_types::pem::Error| {
        invalid(key, field, format!("cannot read PEM certificates from {}: {e}", path.display()))
    };
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(read_error)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read_error)?;
    if certificates.is_empty() {
        return Err(invalid(key, field, format!("{} contains no PEM certificate", path.display())));
    }
    Ok(certificates)
}

fn invalid(key: &str, field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: format!("{key}.{field}"), message: message.into() }
}

/// The verifier behind `tls_insecure_skip_verify`: it accepts any server
/// certificate but still checks the handshake signatures, so the session
/// is encrypted, just not authenticated.
#[derive(Debug)]
struct AcceptAnyCertificate {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

//! Certificate credentials: a client assertion JWT signed with the app
//! registration's certificate key, sent in place of a client secret.
//!
//! The JWT follows Azure AD's rules for certificate credentials. Its header is
//! `{"alg":"RS256","typ":"JWT","x5t":...}`, where `x5t` is the base64url SHA-1
//! thumbprint of the certificate's DER bytes. Its claims are `aud` (the token
//! URL), `iss` and `sub` (both the client id), a random `jti`, `nbf` and `iat`
//! (now) and `exp` (now + 10 minutes).

use std::path::Path;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{RsaKeyPair, RSA_PKCS1_SHA256};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use serde_json::json;

/// How long an assertion is valid. Azure AD accepts up to about an hour;
/// a token request uses its assertion at once.
pub const ASSERTION_LIFETIME_SECS: i64 = 600;

/// The `client_assertion_type` of a JWT bearer assertion (RFC 7523).
pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// A certificate and its RSA key, loaded once at start-up.
pub struct ClientCertificate {
    key: RsaKeyPair,
    thumbprint: String,
    random: SystemRandom,
}

impl std::fmt::Debug for ClientCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCertificate").field("x5t", &self.thumbprint).field("key", &"[redacted]").finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AssertionError {
    #[error("cannot create a random jti")]
    Random,
    #[error("signing the client assertion failed")]
    Sign,
}

impl ClientCertificate {
    /// Reads a PEM certificate and a PEM PKCS#8 RSA key. The error names the
    /// file that failed and never contains key material.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, String> {
        let cert_pem = std::fs::read(cert_path)
            .map_err(|e| format!("cannot read certificate file {}: {e}", cert_path.display()))?;
        let key_pem =
            std::fs::read(key_path).map_err(|e| format!("cannot read key file {}: {e}", key_path.display()))?;
        Self::from_pem(&cert_pem, &key_pem).map_err(|problem| match problem {
            PemProblem::Certificate(message) => format!("certificate file {}: {message}", cert_path.display()),
            PemProblem::Key(message) => format!("key file {}: {message}", key_path.display()),
        })
    }

    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, PemProblem> {
        let cert = CertificateDer::from_pem_slice(cert_pem).map_err(|_| {
            PemProblem::Certificate("no PEM certificate (-----BEGIN CERTIFICATE-----) found".into())
        })?;
        let key = PrivatePkcs8KeyDer::from_pem_slice(key_pem).map_err(|_| {
            PemProblem::Key(
                "no PKCS#8 key (-----BEGIN PRIVATE KEY-----) found; convert a PKCS#1 key with `openssl pkcs8 -topk8 -nocrypt -in old.pem -out key.pem`"
                    .into(),
            )
        })?;
        let key = RsaKeyPair::from_pkcs8(key.secret_pkcs8_der())
            .map_err(|e| PemProblem::Key(format!("not a usable RSA key ({e}); it must be RSA, 2048 bits or more")))?;
        let cert_key = rsa_public_key(cert.as_ref())
            .ok_or_else(|| PemProblem::Certificate("cannot read the RSA public key of the certificate".into()))?;
        if cert_key != key.public().as_ref() {
            return Err(PemProblem::Key("the key does not belong to the certificate".into()));
        }
        Ok(Self { key, thumbprint: thumbprint(cert.as_ref()), random: SystemRandom::new() })
    }

    /// Returns the `x5t` header value, the base64url SHA-1 thumbprint of the certificate.
    pub fn x5t(&self) -> &str {
        &self.thumbprint
    }

    /// Builds a signed assertion for `audience` (the token URL), valid from
    /// `now` (Unix seconds) for [`ASSERTION_LIFETIME_SECS`].
    pub fn assertion(&self, client_id: &str, audience: &str, now: i64) -> Result<String, AssertionError> {
        let mut jti = [0u8; 16];
        self.random.fill(&mut jti).map_err(|_| AssertionError::Random)?;
        let header = json!({ "alg": "RS256", "typ": "JWT", "x5t": self.thumbprint });
        let claims = json!({
            "aud": audience,
            "iss": client_id,
            "sub": client_id,
            "jti": uuid_text(&jti),
            "nbf": now,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME_SECS,
        });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let mut signature = vec![0u8; self.key.public().modulus_len()];
        self.key
            .sign(&RSA_PKCS1_SHA256, &self.random, signing_input.as_bytes(), &mut signature)
            .map_err(|_| AssertionError::Sign)?;
        Ok(format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature)))
    }
}

/// The PEM input that is unusable, with the reason.
#[derive(Debug)]
pub enum PemProblem {
    Certificate(String),
    Key(String),
}

/// Base64url (no padding) of the SHA-1 digest of `cert_der`, as in `x5t`.
pub fn thumbprint(cert_der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, cert_der);
    URL_SAFE_NO_PAD.encode(digest.as_ref())
}

/// Formats 16 random bytes as a version 4 UUID.
fn uuid_text(bytes: &[u8; 16]) -> String {
    let mut b = *bytes;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|byte| format!("{byte:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32])
}

/// Returns the DER `RSAPublicKey` inside an X.509 certificate, the form
/// ring's RSA verification takes, or `None` when the certificate is not RSA
/// or not well-formed DER.
///
/// Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL,
/// serialNumber, signature, issuer, validity, subject,
/// subjectPublicKeyInfo SEQUENCE { algorithm, subjectPublicKey BIT STRING } ... } ... }
pub fn rsa_public_key(cert_der: &[u8]) -> Option<&[u8]> {
    /// rsaEncryption, 1.2.840.113549.1.1.1, as DER content bytes.
    const RSA_ENCRYPTION: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
    const SEQUENCE: u8 = 0x30;

    let (certificate, _) = der_element(cert_der, SEQUENCE)?;
    let (mut tbs, _) = der_element(certificate, SEQUENCE)?;
    if tbs.first() == Some(&0xa0) {
        tbs = der_any(tbs)?.1;
    }
    for _ in 0..5 {
        // serialNumber, signature, issuer, validity, subject
        tbs = der_any(tbs)?.1;
    }
    let (spki, _) = der_element(tbs, SEQUENCE)?;
    let (algorithm, rest) = der_element(spki, SEQUENCE)?;
    let (oid, _) = der_element(algorithm, 0x06)?;
    if oid != RSA_ENCRYPTION {
        return None;
    }
    let (bits, _) = der_element(rest, 0x03)?;
    match bits.split_first() {
        Some((0, key)) => Some(key),
        _ => None,
    }
}

/// Reads one element with tag `tag` and returns its content and what follows.
fn der_element(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    if *input.first()? != tag {
        return None;
    }
    der_any(input)
}

/// Reads one element of any single-byte tag and returns its content and what follows.
fn der_any(input: &[u8]) -> Option<(&[u8], &[u8])> {
    let first_length = *input.get(1)?;
    let (length, header) = if first_length < 0x80 {
        (usize::from(first_length), 2)
    } else {
        let count = usize::from(first_length & 0x7f);
        if count == 0 || count > 4 {
            return None;
        }
        let bytes = input.get(2..2 + count)?;
        let length = bytes.iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (length, 2 + count)
    };
    let end = header.checked_add(length)?;
    Some((input.get(header..end)?, input.get(end..)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{UnparsedPublicKey, RSA_PKCS1_2048_8192_SHA256};
    use serde_json::Value;

    const CERT: &str = include_str!("../../tests/data/client-cert.pem");
    const KEY: &str = include_str!("../../tests/data/client-key.pem");
    const OTHER_KEY: &str = include_str!("../../tests/data/other-key.pem");

    fn decode_part(part: &str) -> Value {
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
    }

    #[test]
    fn assertion_has_required_header_and_claims() {
        let certificate = ClientCertificate::from_pem(CERT.as_bytes(), KEY.as_bytes()).unwrap();
        let jwt = certificate.assertion("app-1", "https://login.example/t/oauth2/v2.0/token", 1_700_000_000).unwrap();
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3);

        let header = decode_part(parts[0]);
        assert_eq!(header["alg"], "RS256");
        assert_eq!(header["typ"], "JWT");
        let cert_der = CertificateDer::from_pem_slice(CERT.as_bytes()).unwrap();
        assert_eq!(header["x5t"], thumbprint(cert_der.as_ref()));

        let claims = decode_part(parts[1]);
        assert_eq!(claims["aud"], "https://login.example/t/oauth2/v2.0/token");
        assert_eq!(claims["iss"], "app-1");
        assert_eq!(claims["sub"], "app-1");
        assert_eq!(claims["nbf"], 1_700_000_000);
        assert_eq!(claims["iat"], 1_700_000_000);
        assert_eq!(claims["exp"], 1_700_000_600);
        assert_eq!(claims["jti"].as_str().unwrap().len(), 36);
    }

    #[test]
    fn assertion_signature_verifies_with_certificate_key() {
        let certificate = ClientCertificate::from_pem(CERT.as_bytes(), KEY.as_bytes()).unwrap();
        let jwt = certificate.assertion("app-1", "aud", 1).unwrap();
        let (signing_input, signature) = jwt.rsplit_once('.').unwrap();
        let cert_der = CertificateDer::from_pem_slice(CERT.as_bytes()).unwrap();
        let public_key = rsa_public_key(cert_der.as_ref()).unwrap();
        let verifier = UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, public_key);
        let signature = URL_SAFE_NO_PAD.decode(signature).unwrap();
        assert!(verifier.verify(signing_input.as_bytes(), &signature).is_ok());
    }

    #[test]
    fn jti_differs_between_assertions() {
        let certificate = ClientCertificate::from_pem(CERT.as_bytes(), KEY.as_bytes()).unwrap();
        let first = decode_part(certificate.assertion("a", "b", 1).unwrap().split('.').nth(1).unwrap());
        let second = decode_part(certificate.assertion("a", "b", 1).unwrap().split('.').nth(1).unwrap());
        assert_ne!(first["jti"], second["jti"]);
    }

    #[test]
    fn key_of_another_certificate_is_rejected() {
        let problem = ClientCertificate::from_pem(CERT.as_bytes(), OTHER_KEY.as_bytes()).unwrap_err();
        assert!(matches!(problem, PemProblem::Key(ref m) if m.contains("does not belong")), "{problem:?}");
    }

    #[test]
    fn swapped_or_missing_pem_is_rejected() {
        assert!(matches!(ClientCertificate::from_pem(KEY.as_bytes(), KEY.as_bytes()), Err(PemProblem::Certificate(_))));
        assert!(matches!(ClientCertificate::from_pem(CERT.as_bytes(), CERT.as_bytes()), Err(PemProblem::Key(_))));
        assert!(matches!(ClientCertificate::from_pem(b"", b""), Err(PemProblem::Certificate(_))));
    }

    #[test]
    fn rsa_public_key_rejects_garbage() {
        assert_eq!(rsa_public_key(b""), None);
        assert_eq!(rsa_public_key(&[0x30, 0x82, 0xff]), None);
        assert_eq!(rsa_public_key(&[0x30, 0x03, 0x30, 0x01, 0x00]), None);
    }
}

//! rustls configurations for both ends: servers that ask for (but do not demand) a client
//! certificate of the cell CA, clients that trust only the cell CA, and the first contact
//! of a node that knows the CA only by its fingerprint.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

use crate::ca::{Identity, fingerprint, identity_of, pem_certificates};

/// The DNS name the master's certificate carries and its clients ask for, whatever
/// address they reach it at. Nodes may not take this name.
pub const MASTER_NAME: &str = "cellmaster";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate chain and its key, with the CA that signed it, all PEM.
#[derive(Clone)]
pub struct Credentials {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").finish_non_exhaustive()
    }
}

impl Credentials {
    fn ca(&self) -> Result<CertificateDer<'static>, String> {
        pem_certificates(&self.ca_pem)?
            .into_iter()
            .next()
            .ok_or_else(|| "no CA certificate".to_string())
    }

    fn chain(&self) -> Result<Vec<CertificateDer<'static>>, String> {
        let mut chain = pem_certificates(&self.cert_pem)?;
        if chain.is_empty() {
            return Err("no certificate".into());
        }
        // Send the CA along: a node that knows only its fingerprint finds it there.
        chain.push(self.ca()?);
        Ok(chain)
    }

    fn key(&self) -> Result<PrivateKeyDer<'static>, String> {
        PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).map_err(|e| format!("key: {e}"))
    }

    /// Role and name of the holder.
    pub fn identity(&self) -> Result<Identity, String> {
        let chain = pem_certificates(&self.cert_pem)?;
        let leaf = chain.first().ok_or("no certificate")?;
        identity_of(leaf)
    }

    pub fn ca_fingerprint(&self) -> Result<String, String> {
        Ok(fingerprint(&self.ca()?))
    }

    /// A server that presents these credentials and reads client certificates of the
    /// CA. Callers without one still connect (the health check needs nothing); each
    /// call is then checked by the `authorize` layer.
    pub fn server_config(&self) -> Result<ServerConfig, String> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca()?).map_err(|e| format!("CA: {e}"))?;
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .allow_unauthenticated()
            .build()
            .map_err(|e| format!("client verifier: {e}"))?;
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| format!("TLS versions: {e}"))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain()?, self.key()?)
            .map_err(|e| format!("server certificate: {e}"))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }

    /// A client that presents these credentials and trusts only the CA.
    pub fn client_config(&self) -> Result<ClientConfig, String> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca()?).map_err(|e| format!("CA: {e}"))?;
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| format!("TLS versions: {e}"))?
            .with_root_certificates(roots)
            .with_client_auth_cert(self.chain()?, self.key()?)
            .map_err(|e| format!("client certificate: {e}"))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }
}

/// A client without a certificate that trusts only the CA in `ca_pem`.
pub fn anonymous_client_config(ca_pem: &str) -> Result<ClientConfig, String> {
    let mut roots = RootCertStore::empty();
    for ca in pem_certificates(ca_pem)? {
        roots.add(ca).map_err(|e| format!("CA: {e}"))?;
    }
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| format!("TLS versions: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// A client without a certificate that trusts a server whose chain holds a CA with
/// SHA-256 `fingerprint` (hex) and whose leaf that CA signed for the name asked for.
/// This is how a booting node first reaches the master.
pub fn pinned_client_config(fingerprint: &str) -> Result<ClientConfig, String> {
    let fingerprint = fingerprint.trim().to_ascii_lowercase();
    if fingerprint.len() != 64 || !fingerprint.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "CA fingerprint {fingerprint:?}: want 64 hex digits (SHA-256)"
        ));
    }
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| format!("TLS versions: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCa {
            fingerprint,
            provider: provider(),
        }))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

#[derive(Debug)]
struct PinnedCa {
    fingerprint: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| fingerprint(c) == self.fingerprint)
            .ok_or_else(|| {
                rustls::Error::General(format!(
                    "the server's chain holds no CA with fingerprint {}",
                    self.fingerprint
                ))
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        verifier.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

//! The cell CA and the certificates it signs. The master holds the CA key; nodes make
//! their key in memory and send a CSR; people get a bundle from `cellmaster admin-cert`.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
};
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::role::{ORG_PREFIX, Role};

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("certificate signing request: {0}")]
    Csr(String),
    #[error("{0}")]
    Invalid(String),
}

/// Who holds a certificate, read from it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub role: Role,
    pub name: String,
    /// Seconds since the epoch after which the certificate is no longer valid.
    pub not_after: i64,
}

/// Reads role and name from a certificate of the cell CA (its signature is the TLS
/// layer's business; this only reads the subject).
pub fn identity_of(der: &[u8]) -> Result<Identity, String> {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
        .map_err(|e| format!("certificate does not parse: {e}"))?;
    let subject = cert.subject();
    let org = subject
        .iter_organization()
        .filter_map(|a| a.as_str().ok())
        .find_map(|o| o.strip_prefix(ORG_PREFIX))
        .ok_or_else(|| format!("certificate names no role (no O={ORG_PREFIX}<role>)"))?;
    let role = Role::parse(org).ok_or_else(|| format!("certificate names unknown role {org:?}"))?;
    let name = subject
        .iter_common_name()
        .filter_map(|a| a.as_str().ok())
        .next()
        .unwrap_or("")
        .to_string();
    Ok(Identity {
        role,
        name,
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// SHA-256 of a certificate's DER, lowercase hex: what `celld.ca=` carries.
pub fn fingerprint(der: &[u8]) -> String {
    hex(&Sha256::digest(der))
}

/// Lowercase hex of `bytes`: digests, fingerprints, keys and tokens all over the cell.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// What a certificate is for: the holder, its role and the names it may serve as.
pub struct Subject<'a> {
    pub role: Role,
    pub name: &'a str,
    /// DNS names the holder may serve TLS as (empty: a client-only certificate).
    pub dns_names: Vec<String>,
    pub ttl: Duration,
}

/// The cell's certificate authority.
pub struct CellCa {
    issuer: Issuer<'static, KeyPair>,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
}

impl CellCa {
    /// A new CA named after the cell, valid for ten years. Returns it and its key in PEM.
    pub fn create(cell: &str) -> Result<(CellCa, String), CaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("celld cell CA {cell}"));
        params
            .distinguished_name
            .push(DnType::OrganizationName, "celld");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(3650);
        let cert = params.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        let ca = CellCa {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        };
        Ok((ca, key_pem))
    }

    /// The CA from its certificate and key, both PEM.
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<CellCa, CaError> {
        let key = KeyPair::from_pem(key_pem)?;
        let cert_der = pem_certificates(cert_pem)
            .map_err(CaError::Invalid)?
            .into_iter()
            .next()
            .ok_or_else(|| CaError::Invalid("no certificate in the CA file".into()))?;
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)?;
        if issuer.key().der_bytes() != public_key_of(&cert_der).map_err(CaError::Invalid)? {
            return Err(CaError::Invalid(
                "the CA key does not belong to the CA certificate".into(),
            ));
        }
        Ok(CellCa {
            cert_pem: cert_pem.to_string(),
            cert_der,
            issuer,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    pub fn fingerprint(&self) -> String {
        fingerprint(&self.cert_der)
    }

    /// Signs `public_key` for `subject`; returns the certificate in PEM.
    pub fn issue(
        &self,
        public_key: &impl PublicKeyData,
        subject: &Subject,
    ) -> Result<String, CaError> {
        let mut params = CertificateParams::new(subject.dns_names.clone())?;
        params
            .distinguished_name
            .push(DnType::CommonName, subject.name);
        params.distinguished_name.push(
            DnType::OrganizationName,
            format!("{ORG_PREFIX}{}", subject.role),
        );
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        if !subject.dns_names.is_empty() {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        params.use_authority_key_identifier_extension = true;
        // A minute of slack for clocks a little behind the master's.
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now
            + time::Duration::try_from(subject.ttl)
                .map_err(|e| CaError::Invalid(format!("ttl: {e}")))?;
        Ok(params.signed_by(public_key, &self.issuer)?.pem())
    }

    /// Signs the key in a CSR (its signature checked) for `subject`; the CSR's own
    /// subject and extensions are ignored: the master decides who the holder is.
    pub fn sign_csr(&self, csr_der: &[u8], subject: &Subject) -> Result<String, CaError> {
        let csr = CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(
            csr_der.to_vec(),
        ))
        .map_err(|e| CaError::Csr(e.to_string()))?;
        self.issue(&csr.public_key, subject)
    }

    /// A fresh key and a certificate for it, for a client bundle or the master itself.
    pub fn issue_with_key(&self, subject: &Subject) -> Result<(String, String), CaError> {
        let key = KeyPair::generate()?;
        let cert = self.issue(&key, subject)?;
        Ok((cert, key.serialize_pem()))
    }
}

/// A fresh in-memory key and a CSR for it. Returns (key, CSR DER).
pub fn new_key_and_csr(name: &str) -> Result<(KeyPair, Vec<u8>), CaError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, name);
    let csr = params.serialize_request(&key)?;
    Ok((key, csr.der().to_vec()))
}

/// Every certificate in a PEM text, in order.
pub fn pem_certificates(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("PEM certificates: {e}"))
}

fn public_key_of(der: &[u8]) -> Result<Vec<u8>, String> {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
        .map_err(|e| format!("CA certificate does not parse: {e}"))?;
    Ok(cert.public_key().subject_public_key.data.to_vec())
}

/// Seconds since the epoch, now.
pub fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

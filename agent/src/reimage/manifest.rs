//! The image manifest `cellimg build` writes, and the check that the master signed it.
//! The signature covers the manifest's exact bytes, so nothing is re-serialised.

use std::collections::BTreeMap;

use ed25519_dalek::{Signature, VerifyingKey};

use super::ReimageError;

/// The artifact names a reimage needs from a manifest.
pub const KERNEL: &str = "vmlinuz";
pub const INITRAMFS: &str = "initramfs.cpio.gz";

/// What a manifest says about one file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct ArtifactDigest {
    /// Lowercase hex.
    pub sha256: String,
    pub size: u64,
}

/// The parts of `manifest.json` a node relies on; other keys are the builder's business.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Manifest {
    pub version: String,
    #[serde(default)]
    pub kernel_cmdline: String,
    pub artifacts: BTreeMap<String, ArtifactDigest>,
}

impl Manifest {
    /// Parses the manifest and checks that it names a kernel and an initramfs with
    /// well-formed digests.
    pub fn parse(bytes: &[u8]) -> Result<Manifest, ReimageError> {
        let bad = |problem: String| ReimageError::Manifest { problem };
        let m: Manifest = serde_json::from_slice(bytes)
            .map_err(|e| bad(format!("not the manifest.json of cellimg build: {e}")))?;
        for name in [KERNEL, INITRAMFS] {
            let a = m
                .artifacts
                .get(name)
                .ok_or_else(|| bad(format!("artifacts.{name} is missing")))?;
            let hex_ok = a.sha256.len() == 64
                && a.sha256
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            if !hex_ok {
                return Err(bad(format!(
                    "artifacts.{name}.sha256 {:?} is not 64 lowercase hex characters",
                    a.sha256
                )));
            }
        }
        Ok(m)
    }

    pub fn artifact(&self, name: &str) -> &ArtifactDigest {
        // parse() refuses a manifest without KERNEL or INITRAMFS.
        &self.artifacts[name]
    }
}

/// Checks that `signature` is `key`'s ed25519 signature of exactly `manifest`.
pub fn verify_signature(
    key: &VerifyingKey,
    manifest: &[u8],
    signature: &[u8],
) -> Result<(), ReimageError> {
    let bytes: [u8; 64] = signature
        .try_into()
        .map_err(|_| ReimageError::SignatureLength {
            got: signature.len(),
        })?;
    // verify_strict also refuses the malleable and small-order forms plain verify allows.
    key.verify_strict(manifest, &Signature::from_bytes(&bytes))
        .map_err(|_| ReimageError::BadSignature)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};

    const MANIFEST: &str = r#"{"version":"v2","kernel_cmdline":"console=ttyS0","artifacts":{
        "vmlinuz":{"sha256":"2bd7692f620f2cf7b0cbf6728581edbb34d4a3c33177f3a887d4c1a67d8c6396","size":10},
        "initramfs.cpio.gz":{"sha256":"dfbe09b30d6335cbb607cd6e1f0dec839d39d5619d0608708a1bd8f03d43ea7c","size":20},
        "node.iso":{"sha256":"x","size":1}}}"#;

    #[test]
    fn parses_the_builder_manifest_and_checks_digests() {
        let m = Manifest::parse(MANIFEST.as_bytes()).unwrap();
        assert_eq!(m.version, "v2");
        assert_eq!(m.artifact(KERNEL).size, 10);
        assert_eq!(m.artifact(INITRAMFS).size, 20);
        let no_kernel = MANIFEST.replace("\"vmlinuz\"", "\"bzImage\"");
        let e = Manifest::parse(no_kernel.as_bytes()).unwrap_err();
        assert!(
            e.to_string().contains("artifacts.vmlinuz is missing"),
            "{e}"
        );
        let upper = MANIFEST.replace("2bd7692f", "2BD7692F");
        let e = Manifest::parse(upper.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("artifacts.vmlinuz.sha256"), "{e}");
        let e = Manifest::parse(b"not json").unwrap_err();
        assert!(e.to_string().starts_with("manifest: "), "{e}");
    }

    #[test]
    fn only_the_exact_bytes_signed_by_the_key_verify() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let other = SigningKey::from_bytes(&[8; 32]);
        let sig = key.sign(MANIFEST.as_bytes()).to_bytes();
        let public = key.verifying_key();
        verify_signature(&public, MANIFEST.as_bytes(), &sig).unwrap();
        let changed = MANIFEST.replace("v2", "v3");
        assert!(matches!(
            verify_signature(&public, changed.as_bytes(), &sig),
            Err(ReimageError::BadSignature)
        ));
        let by_other = other.sign(MANIFEST.as_bytes()).to_bytes();
        assert!(matches!(
            verify_signature(&public, MANIFEST.as_bytes(), &by_other),
            Err(ReimageError::BadSignature)
        ));
        assert!(matches!(
            verify_signature(&public, MANIFEST.as_bytes(), &sig[..63]),
            Err(ReimageError::SignatureLength { got: 63 })
        ));
    }
}

//! The image manifest `cellimg build` writes (read by `celld_trust::manifest`, as the
//! master reads it), and the check that the master signed it.
//! The signature covers the manifest's exact bytes, so nothing is re-serialised.

use ed25519_dalek::{Signature, VerifyingKey};

use super::ReimageError;

pub use celld_trust::manifest::{ArtifactDigest, INITRAMFS, KERNEL, Manifest, ManifestError};

impl From<ManifestError> for ReimageError {
    fn from(e: ManifestError) -> Self {
        ReimageError::Manifest { problem: e.0 }
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

    // The signature covers bytes, whatever they say: a short manifest will do.
    const MANIFEST: &str = r#"{"version":"v2","artifacts":{}}"#;

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

//! `manifest.json` as `cellimg build` writes it, read the same way by the master (before
//! it signs an image) and by a node (after it checked the master's signature), so the
//! master never signs a manifest its nodes would refuse.

use std::collections::BTreeMap;

/// The artifacts a reimage boots: kernel and initramfs.
pub const KERNEL: &str = "vmlinuz";
pub const INITRAMFS: &str = "initramfs.cpio.gz";
pub const BOOT_ARTIFACTS: [&str; 2] = [KERNEL, INITRAMFS];

/// What a manifest says about one file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct ArtifactDigest {
    /// Lowercase hex (checked for the boot artifacts).
    pub sha256: String,
    pub size: u64,
}

/// The parts of `manifest.json` the cell relies on; other keys are the builder's business.
/// A key given twice at the top level is refused (serde's derive).
#[derive(Debug, Clone, serde::Deserialize)]
struct Raw {
    version: String,
    #[serde(default)]
    kernel_cmdline: String,
    artifacts: BTreeMap<String, ArtifactDigest>,
}

/// A manifest that names a kernel and an initramfs with well-formed digests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub version: String,
    pub kernel_cmdline: String,
    pub kernel: ArtifactDigest,
    pub initramfs: ArtifactDigest,
}

/// Why a manifest was refused.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ManifestError(pub String);

impl Manifest {
    /// Parses the manifest and checks its boot artifacts.
    pub fn parse(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        let bad = |problem: String| ManifestError(problem);
        let mut raw: Raw = serde_json::from_slice(bytes)
            .map_err(|e| bad(format!("not the manifest.json of cellimg build: {e}")))?;
        let mut take = |name: &str| {
            let a = raw
                .artifacts
                .remove(name)
                .ok_or_else(|| bad(format!("artifacts.{name} is missing")))?;
            let hex_ok = a.sha256.len() == 64
                && a.sha256
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            if hex_ok {
                Ok(a)
            } else {
                Err(bad(format!(
                    "artifacts.{name}.sha256 {:?} is not 64 lowercase hex characters",
                    a.sha256
                )))
            }
        };
        let kernel = take(KERNEL)?;
        let initramfs = take(INITRAMFS)?;
        Ok(Manifest {
            version: raw.version,
            kernel_cmdline: raw.kernel_cmdline,
            kernel,
            initramfs,
        })
    }

    /// The boot artifacts with their names, kernel first.
    pub fn boot_artifacts(&self) -> [(&'static str, &ArtifactDigest); 2] {
        [(KERNEL, &self.kernel), (INITRAMFS, &self.initramfs)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANIFEST: &str = r#"{"version":"v2","kernel_cmdline":"console=ttyS0","artifacts":{
        "vmlinuz":{"sha256":"2bd7692f620f2cf7b0cbf6728581edbb34d4a3c33177f3a887d4c1a67d8c6396","size":10},
        "initramfs.cpio.gz":{"sha256":"dfbe09b30d6335cbb607cd6e1f0dec839d39d5619d0608708a1bd8f03d43ea7c","size":20},
        "node.iso":{"sha256":"x","size":1}}}"#;

    #[test]
    fn parses_the_builder_manifest_and_checks_digests() {
        let m = Manifest::parse(MANIFEST.as_bytes()).unwrap();
        assert_eq!(m.version, "v2");
        assert_eq!(m.kernel.size, 10);
        assert_eq!(m.initramfs.size, 20);
        assert_eq!(m.kernel_cmdline, "console=ttyS0");
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
        assert!(e.to_string().starts_with("not the manifest.json"), "{e}");
    }

    #[test]
    fn a_key_given_twice_or_of_the_wrong_type_is_refused() {
        let twice = MANIFEST.replace(r#""version":"v2","#, r#""version":"v2","version":"v9","#);
        let e = Manifest::parse(twice.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("duplicate field"), "{e}");
        let null_cmdline = MANIFEST.replace(r#""console=ttyS0""#, "null");
        assert!(Manifest::parse(null_cmdline.as_bytes()).is_err());
        let bad_size = MANIFEST.replace(r#""size":1}"#, r#""size":"1"}"#);
        assert!(Manifest::parse(bad_size.as_bytes()).is_err());
    }
}

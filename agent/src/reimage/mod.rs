//! Reimage: moving this node to another image version without a trip through the
//! firmware. The master sends a version, where to fetch its kernel and initramfs, the
//! command line, and the image manifest signed with its key; the node checks everything
//! it can before it touches anything, downloads both artifacts into memory (bounded in
//! size and time), checks their sha256 against the signed manifest and stages them with
//! `kexec_file_load`. Any refusal leaves the node running its current image.
//!
//! This room only prepares and stages; stopping tasks and the reboot itself belong to
//! the power path of `main` (the same one Reboot and ctrl-alt-del take).

pub mod fetch;
pub mod manifest;

use std::ffi::CString;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ed25519_dalek::VerifyingKey;

use crate::config::NodeConfig;
use manifest::{INITRAMFS, KERNEL, Manifest};

/// Longest kernel command line x86 takes (COMMAND_LINE_SIZE, NUL excluded).
const MAX_CMDLINE: usize = 2047;

/// Why a reimage was refused. Every one leaves the node as it was.
#[derive(Debug, thiserror::Error)]
pub enum ReimageError {
    #[error("no master_key configured: this node trusts no image")]
    NoMasterKey,
    #[error("a reimage is already under way")]
    Busy,
    #[error("version: {problem}")]
    Version { problem: String },
    #[error("manifest: {problem}")]
    Manifest { problem: String },
    #[error("manifest_signature: an ed25519 signature is 64 bytes, got {got}")]
    SignatureLength { got: usize },
    #[error("manifest signature does not verify with this node's master_key")]
    BadSignature,
    #[error("{field}: {url:?} is not http://host[:port]/path: {problem}")]
    Url {
        field: &'static str,
        url: String,
        problem: String,
    },
    #[error("cmdline: {problem}")]
    Cmdline { problem: String },
    #[error("{what} too big: {size} bytes over the cap of {cap}")]
    TooBig {
        what: &'static str,
        size: u64,
        cap: u64,
    },
    #[error("download of {url} stalled: no bytes for {ms} ms")]
    Stalled { url: String, ms: u64 },
    #[error("download of {url}: {problem}")]
    Http { url: String, problem: String },
    #[error("download of {url}: {when} is {got} bytes, the manifest says {want}")]
    WrongSize {
        url: String,
        got: u64,
        want: u64,
        when: &'static str,
    },
    #[error("{name}: sha256 mismatch: got {got}, manifest says {want}")]
    Checksum {
        name: &'static str,
        got: String,
        want: String,
    },
    #[error("memory for the new image: {problem}")]
    Memory { problem: String },
    /// Every check passed, but a daemon does not replace the kernel of its host.
    #[error(
        "verified {version} (signature, sizes and sha256 of {kernel_bytes}-byte vmlinuz and \
         {initramfs_bytes}-byte initramfs.cpio.gz): celld is not PID 1 here, so it does not \
         kexec its host"
    )]
    VerifiedNotPid1 {
        version: String,
        kernel_bytes: u64,
        initramfs_bytes: u64,
    },
}

/// The node's reimage settings, from its config.
#[derive(Debug, Clone)]
pub struct ReimageSettings {
    pub master_key: Option<VerifyingKey>,
    pub max_bytes: u64,
    pub stall: Duration,
}

impl ReimageSettings {
    /// From a config that passed `NodeConfig::check` (a bad key there is reported and
    /// left out, so here it can only be empty or good).
    pub fn from_config(cfg: &NodeConfig) -> Self {
        Self {
            master_key: crate::config::parse_master_key(&cfg.master_key).ok(),
            max_bytes: cfg.reimage_max_bytes,
            stall: Duration::from_millis(cfg.reimage_stall_ms),
        }
    }
}

/// What a reimage asks for, out of the wire type.
#[derive(Debug, Clone, Default)]
pub struct ReimageOrder {
    pub version: String,
    pub kernel_url: String,
    pub initramfs_url: String,
    pub cmdline: String,
    pub manifest: Vec<u8>,
    pub manifest_signature: Vec<u8>,
}

/// A verified new image in memory, ready to stage.
pub struct VerifiedImage {
    pub version: String,
    pub kernel: OwnedFd,
    pub initramfs: OwnedFd,
    pub cmdline: CString,
    pub kernel_bytes: u64,
    pub initramfs_bytes: u64,
}

impl VerifiedImage {
    /// Stages the image as the kernel the next reboot(KEXEC) starts.
    pub fn stage(&self) -> Result<(), nix::errno::Errno> {
        crate::sys::kexec_file_load(self.kernel.as_fd(), self.initramfs.as_fd(), &self.cmdline)
    }
}

/// One reimage at a time, and the last refusal for status.
pub struct Reimager {
    settings: ReimageSettings,
    busy: AtomicBool,
    last_error: Mutex<String>,
    /// The node's status generation: bumped when what status shows of reimage changes.
    generation: Arc<AtomicU64>,
}

/// Recorded when a reimage call ends before it finished (the caller went away, or its
/// deadline or the server's request limit passed): the downloads stop and nothing changed.
pub const ABANDONED: &str = "the Reimage call ended before the node finished checking and \
                             downloading (caller gone or deadline passed): nothing changed";

/// Holds the one-reimage turn; gives it back when dropped unless kept.
pub struct Turn<'a> {
    reimager: &'a Reimager,
    keep: bool,
}

impl Turn<'_> {
    /// The node is on its way into the new image: no other reimage may start.
    pub fn keep(mut self) {
        self.keep = true;
    }
}

impl Drop for Turn<'_> {
    /// A turn dropped unkept ends its reimage. A cancelled call leaves ABANDONED as the
    /// reason; a call that ends normally records its real outcome right after.
    fn drop(&mut self) {
        if !self.keep {
            self.reimager.busy.store(false, Ordering::SeqCst);
            self.reimager.record(Some(ABANDONED.to_string()));
        }
    }
}

impl Reimager {
    pub fn new(settings: ReimageSettings, generation: Arc<AtomicU64>) -> Self {
        Self {
            settings,
            busy: AtomicBool::new(false),
            last_error: Mutex::new(String::new()),
            generation,
        }
    }

    pub fn in_progress(&self) -> bool {
        self.busy.load(Ordering::SeqCst)
    }

    /// The last refusal, empty when there was none.
    pub fn last_error(&self) -> String {
        self.last_error
            .lock()
            .map(|e| e.clone())
            .unwrap_or_default()
    }

    /// Keeps why the last reimage was refused (None: it was accepted).
    pub fn record(&self, refusal: Option<String>) {
        if let Ok(mut e) = self.last_error.lock() {
            *e = refusal.unwrap_or_default();
        }
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Takes the one-reimage turn.
    pub fn begin(&self) -> Result<Turn<'_>, ReimageError> {
        if self.settings.master_key.is_none() {
            return Err(ReimageError::NoMasterKey);
        }
        if self.busy.swap(true, Ordering::SeqCst) {
            return Err(ReimageError::Busy);
        }
        self.generation.fetch_add(1, Ordering::SeqCst);
        Ok(Turn {
            reimager: self,
            keep: false,
        })
    }

    /// Every check, in order, then both downloads; the image is in memory afterwards.
    pub async fn verify_and_fetch(
        &self,
        _turn: &Turn<'_>,
        order: &ReimageOrder,
    ) -> Result<VerifiedImage, ReimageError> {
        let key = self
            .settings
            .master_key
            .as_ref()
            .ok_or(ReimageError::NoMasterKey)?;
        let CheckedOrder {
            manifest,
            kernel_url,
            initramfs_url,
            cmdline,
        } = check_order(key, order, self.settings.max_bytes)?;
        let mut files = Vec::with_capacity(2);
        for (name, want, text, url) in [
            (KERNEL, &manifest.kernel, &order.kernel_url, &kernel_url),
            (
                INITRAMFS,
                &manifest.initramfs,
                &order.initramfs_url,
                &initramfs_url,
            ),
        ] {
            let limits = fetch::Limits {
                size: want.size,
                stall: self.settings.stall,
            };
            tracing::info!(artifact = name, url = %text, bytes = want.size, "reimage: downloading");
            let got = fetch::download(text, url, name, &limits).await?;
            if got.sha256 != want.sha256 {
                return Err(ReimageError::Checksum {
                    name,
                    got: got.sha256,
                    want: want.sha256.clone(),
                });
            }
            files.push(got);
        }
        let (Some(initramfs), Some(kernel)) = (files.pop(), files.pop()) else {
            return Err(ReimageError::Memory {
                problem: "lost a downloaded artifact".into(),
            });
        };
        Ok(VerifiedImage {
            version: manifest.version,
            kernel_bytes: kernel.bytes,
            initramfs_bytes: initramfs.bytes,
            kernel: kernel.file,
            initramfs: initramfs.file,
            cmdline,
        })
    }
}

/// A reimage order that passed every check made before a download.
pub struct CheckedOrder {
    pub manifest: Manifest,
    pub kernel_url: fetch::HttpUrl,
    pub initramfs_url: fetch::HttpUrl,
    pub cmdline: CString,
}

/// The checks of a reimage order that need no network, in the order a refusal reports
/// them: version, manifest, its signature by `key`, both URLs, command line, sizes
/// against `max_bytes`. Pure, so the fuzz tests run it on arbitrary requests.
pub fn check_order(
    key: &VerifyingKey,
    order: &ReimageOrder,
    max_bytes: u64,
) -> Result<CheckedOrder, ReimageError> {
    if order.version.is_empty() {
        return Err(ReimageError::Version {
            problem: "is required".into(),
        });
    }
    let manifest = Manifest::parse(&order.manifest)?;
    if manifest.version != order.version {
        return Err(ReimageError::Version {
            problem: format!(
                "the request asks for {:?} but the manifest is of {:?}",
                order.version, manifest.version
            ),
        });
    }
    manifest::verify_signature(key, &order.manifest, &order.manifest_signature)?;
    let kernel_url = fetch::parse_url("kernel_url", &order.kernel_url)?;
    let initramfs_url = fetch::parse_url("initramfs_url", &order.initramfs_url)?;
    let cmdline = check_cmdline(&order.cmdline, &manifest)?;
    for (what, size) in [
        ("kernel", manifest.kernel.size),
        ("initramfs", manifest.initramfs.size),
    ] {
        if size > max_bytes {
            return Err(ReimageError::TooBig {
                what,
                size,
                cap: max_bytes,
            });
        }
    }
    Ok(CheckedOrder {
        manifest,
        kernel_url,
        initramfs_url,
        cmdline,
    })
}

/// The command line the new kernel gets: the request's, or the manifest's when empty.
fn check_cmdline(given: &str, manifest: &Manifest) -> Result<CString, ReimageError> {
    let text = if given.is_empty() {
        manifest.kernel_cmdline.as_str()
    } else {
        given
    };
    if text.len() > MAX_CMDLINE {
        return Err(ReimageError::Cmdline {
            problem: format!(
                "{} bytes; the kernel takes at most {MAX_CMDLINE}",
                text.len()
            ),
        });
    }
    CString::new(text).map_err(|_| ReimageError::Cmdline {
        problem: "contains a NUL byte".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};

    const MANIFEST: &str = r#"{"version":"v2","kernel_cmdline":"console=ttyS0","artifacts":{
        "vmlinuz":{"sha256":"2bd7692f620f2cf7b0cbf6728581edbb34d4a3c33177f3a887d4c1a67d8c6396","size":10},
        "initramfs.cpio.gz":{"sha256":"dfbe09b30d6335cbb607cd6e1f0dec839d39d5619d0608708a1bd8f03d43ea7c","size":20}}}"#;

    fn order(key: &SigningKey) -> ReimageOrder {
        ReimageOrder {
            version: "v2".into(),
            kernel_url: "http://10.0.0.1/v2/vmlinuz".into(),
            initramfs_url: "http://10.0.0.1:8080/v2/initramfs.cpio.gz".into(),
            cmdline: String::new(),
            manifest: MANIFEST.into(),
            manifest_signature: key.sign(MANIFEST.as_bytes()).to_bytes().to_vec(),
        }
    }

    #[test]
    fn an_order_is_checked_whole_before_any_download() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let public = key.verifying_key();
        let good = check_order(&public, &order(&key), 1 << 20).unwrap();
        assert_eq!(good.cmdline.to_str(), Ok("console=ttyS0"));
        let e = check_order(&public, &order(&key), 15).err().unwrap();
        assert!(
            matches!(
                e,
                ReimageError::TooBig {
                    what: "initramfs",
                    size: 20,
                    cap: 15
                }
            ),
            "{e}"
        );
        let other = SigningKey::from_bytes(&[8; 32]);
        let e = check_order(&public, &order(&other), 1 << 20).err().unwrap();
        assert!(matches!(e, ReimageError::BadSignature), "{e}");
        let bad_url = ReimageOrder {
            kernel_url: "https://10.0.0.1/v2/vmlinuz".into(),
            ..order(&key)
        };
        let e = check_order(&public, &bad_url, 1 << 20).err().unwrap();
        assert!(
            matches!(
                e,
                ReimageError::Url {
                    field: "kernel_url",
                    ..
                }
            ),
            "{e}"
        );
        let nul = ReimageOrder {
            cmdline: "console=ttyS0\0".into(),
            ..order(&key)
        };
        let e = check_order(&public, &nul, 1 << 20).err().unwrap();
        assert!(matches!(e, ReimageError::Cmdline { .. }), "{e}");
    }
}

//! The master's node images, by version: `cellimg build` outputs checked against their
//! own manifest and kept under `<state dir>/images/<version>/`, each manifest signed with
//! the master's ed25519 key. Nodes carry the public key (`celld.master_key=`) and refuse
//! a reimage whose manifest this key did not sign.
//!
//! Adding is atomic: files go to a hidden directory that is renamed into place once all
//! of them are checked and written, so a crash leaves either the whole version or none.
//! The key is created at first start in `<state dir>/master-signing.key` (mode 0600).

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use celld_trust::ca::hex;
use celld_trust::manifest::Manifest;
use ed25519_dalek::{Signer, SigningKey};
use sha2::{Digest, Sha256};

/// The artifacts a node boots from; every image has them.
pub use celld_trust::manifest::BOOT_ARTIFACTS;
/// What an image directory holds.
pub const FILES: [&str; 4] = [
    "manifest.json",
    "manifest.sig",
    "vmlinuz",
    "initramfs.cpio.gz",
];
/// Largest artifact the master accepts.
pub const MAX_ARTIFACT_BYTES: u64 = 512 << 20;
const DEFAULT_FILE: &str = "DEFAULT";

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{0}")]
    Invalid(String),
    #[error("image {0} exists already")]
    Exists(String),
    #[error("image {0} does not exist")]
    NotFound(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ImageError {
    let what = what.into();
    move |source| ImageError::Io { what, source }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// A version name: it becomes a directory and part of URLs.
pub fn check_version(v: &str) -> Result<(), ImageError> {
    let ok = !v.is_empty()
        && v.len() <= 64
        && !v.starts_with('.')
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ImageError::Invalid(format!(
            "version {v:?}: use [A-Za-z0-9._-], 1 to 64 characters, not starting with '.'"
        )))
    }
}

/// What the master knows of one stored image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub version: String,
    /// The manifest's exact bytes, as signed.
    pub manifest: Vec<u8>,
    pub signature: Vec<u8>,
    pub kernel_cmdline: String,
    /// Bytes of vmlinuz + initramfs.
    pub boot_bytes: u64,
}

pub struct ImageStore {
    dir: PathBuf,
    key: SigningKey,
}

/// Reads a manifest as nodes read it (`celld_trust::manifest`): the master signs nothing
/// a node would refuse.
pub fn read_manifest(bytes: &[u8]) -> Result<Manifest, ImageError> {
    Manifest::parse(bytes).map_err(|e| ImageError::Invalid(format!("manifest.json: {e}")))
}

impl ImageStore {
    /// Opens the store under `state_dir`, creating the key at first start.
    pub fn open(state_dir: &Path) -> Result<Self, ImageError> {
        let dir = state_dir.join("images");
        std::fs::create_dir_all(&dir).map_err(io(format!("{}", dir.display())))?;
        let key_path = state_dir.join("master-signing.key");
        let key = match std::fs::read_to_string(&key_path) {
            Ok(text) => parse_key(text.trim()).ok_or_else(|| {
                ImageError::Invalid(format!(
                    "{}: not 64 hex characters (an ed25519 seed)",
                    key_path.display()
                ))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => create_key(&key_path)?,
            Err(e) => return Err(io(format!("{}", key_path.display()))(e)),
        };
        Ok(Self { dir, key })
    }

    /// The public key nodes must carry, lowercase hex.
    pub fn public_key_hex(&self) -> String {
        hex(self.key.verifying_key().as_bytes())
    }

    /// Checks `files` (name, bytes) against their manifest, signs it and keeps the image.
    pub fn add(&self, files: &[(String, Vec<u8>)]) -> Result<Image, ImageError> {
        let file = |name: &str| {
            files
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, b)| b.as_slice())
                .ok_or_else(|| ImageError::Invalid(format!("{name} is missing")))
        };
        for (name, _) in files {
            if !BOOT_ARTIFACTS.contains(&name.as_str()) && name != "manifest.json" {
                return Err(ImageError::Invalid(format!(
                    "{name:?} is not part of an image (manifest.json, vmlinuz, initramfs.cpio.gz)"
                )));
            }
        }
        let manifest = file("manifest.json")?;
        let parsed = read_manifest(manifest)?;
        check_version(&parsed.version)?;
        let mut boot_bytes = 0;
        for (name, digest) in parsed.boot_artifacts() {
            let (sha, size) = (&digest.sha256, digest.size);
            let body = file(name)?;
            if body.len() as u64 != size {
                return Err(ImageError::Invalid(format!(
                    "{name}: {} bytes, the manifest says {size}",
                    body.len()
                )));
            }
            let got = sha256_hex(body);
            if &got != sha {
                return Err(ImageError::Invalid(format!(
                    "{name}: sha256 {got}, the manifest says {sha}"
                )));
            }
            boot_bytes += size;
        }
        let Manifest {
            version,
            kernel_cmdline,
            ..
        } = parsed;
        let target = self.dir.join(&version);
        if target.exists() {
            return Err(ImageError::Exists(version));
        }
        let signature = self.key.sign(manifest).to_bytes().to_vec();
        let staging = self
            .dir
            .join(format!(".adding-{version}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir(&staging).map_err(io(format!("{}", staging.display())))?;
        let write = |name: &str, body: &[u8]| -> Result<(), ImageError> {
            let path = staging.join(name);
            let mut f = std::fs::File::create(&path).map_err(io(format!("{}", path.display())))?;
            f.write_all(body)
                .and_then(|()| f.sync_all())
                .map_err(io(format!("{}", path.display())))
        };
        write("manifest.json", manifest)?;
        write("manifest.sig", &signature)?;
        for name in BOOT_ARTIFACTS {
            write(name, file(name)?)?;
        }
        std::fs::rename(&staging, &target).map_err(io(format!("{}", target.display())))?;
        sync_dir(&self.dir)?;
        if self.default_version().is_none() {
            self.set_default(&version)?;
        }
        tracing::info!(%version, boot_bytes, "image added and signed");
        Ok(Image {
            version,
            manifest: manifest.to_vec(),
            signature,
            kernel_cmdline,
            boot_bytes,
        })
    }

    pub fn get(&self, version: &str) -> Result<Image, ImageError> {
        check_version(version)?;
        let dir = self.dir.join(version);
        if !dir.is_dir() {
            return Err(ImageError::NotFound(version.to_string()));
        }
        let read =
            |name: &str| std::fs::read(dir.join(name)).map_err(io(format!("{version}/{name}")));
        let manifest = read("manifest.json")?;
        let parsed = read_manifest(&manifest)?;
        Ok(Image {
            version: version.to_string(),
            signature: read("manifest.sig")?,
            manifest,
            kernel_cmdline: parsed.kernel_cmdline,
            boot_bytes: parsed.kernel.size + parsed.initramfs.size,
        })
    }

    /// Every stored version, sorted.
    pub fn list(&self) -> Result<Vec<Image>, ImageError> {
        let mut versions: Vec<String> = std::fs::read_dir(&self.dir)
            .map_err(io(format!("{}", self.dir.display())))?
            .flatten()
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| !n.starts_with('.'))
            .collect();
        versions.sort();
        versions.iter().map(|v| self.get(v)).collect()
    }

    /// The path of one artifact of one version, if both exist.
    pub fn artifact(&self, version: &str, name: &str) -> Option<PathBuf> {
        check_version(version).ok()?;
        if !FILES.contains(&name) {
            return None;
        }
        let p = self.dir.join(version).join(name);
        p.is_file().then_some(p)
    }

    /// The version machines the master does not know boot.
    pub fn default_version(&self) -> Option<String> {
        let v = std::fs::read_to_string(self.dir.join(DEFAULT_FILE)).ok()?;
        let v = v.trim().to_string();
        self.dir.join(&v).is_dir().then_some(v)
    }

    pub fn set_default(&self, version: &str) -> Result<(), ImageError> {
        self.get(version)?;
        let tmp = self.dir.join(".DEFAULT.new");
        std::fs::write(&tmp, format!("{version}\n")).map_err(io("images/DEFAULT"))?;
        std::fs::rename(&tmp, self.dir.join(DEFAULT_FILE)).map_err(io("images/DEFAULT"))
    }
}

fn parse_key(text: &str) -> Option<SigningKey> {
    if text.len() != 64 {
        return None;
    }
    let mut seed = [0u8; 32];
    for (i, b) in seed.iter_mut().enumerate() {
        *b = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(SigningKey::from_bytes(&seed))
}

fn create_key(path: &Path) -> Result<SigningKey, ImageError> {
    let mut seed = [0u8; 32];
    crate::trust::random_bytes(&mut seed).map_err(io("/dev/urandom"))?;
    let key = SigningKey::from_bytes(&seed);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io(format!("{}", path.display())))?;
    f.write_all(format!("{}\n", hex(&seed)).as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(io(format!("{}", path.display())))?;
    // Whatever the umask did, only the master reads it.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io(format!("{}", path.display())))?;
    tracing::info!(path = %path.display(), public_key = %hex(key.verifying_key().as_bytes()), "signing key created");
    Ok(key)
}

fn sync_dir(dir: &Path) -> Result<(), ImageError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(format!("{}", dir.display())))
}

#[cfg(test)]
mod tests;

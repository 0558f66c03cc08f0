use super::*;
use ed25519_dalek::{Signature, Verifier};

/// An image's files with a manifest that matches them.
fn image(version: &str, kernel: &[u8], initramfs: &[u8]) -> Vec<(String, Vec<u8>)> {
    let manifest = serde_json::json!({
        "version": version,
        "kernel_cmdline": "console=ttyS0",
        "artifacts": {
            "vmlinuz": {"sha256": sha256_hex(kernel), "size": kernel.len()},
            "initramfs.cpio.gz": {"sha256": sha256_hex(initramfs), "size": initramfs.len()},
        }
    });
    vec![
        (
            "manifest.json".into(),
            serde_json::to_vec_pretty(&manifest).unwrap(),
        ),
        ("vmlinuz".into(), kernel.to_vec()),
        ("initramfs.cpio.gz".into(), initramfs.to_vec()),
    ]
}

#[test]
fn an_added_image_is_kept_signed_and_served() {
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(dir.path()).unwrap();
    let added = store.add(&image("v1", b"kernel", b"initramfs")).unwrap();
    assert_eq!(added.boot_bytes, 15);
    let key = store.key.verifying_key();
    let sig = Signature::from_slice(&added.signature).unwrap();
    key.verify(&added.manifest, &sig).unwrap();
    assert_eq!(store.get("v1").unwrap(), added);
    assert_eq!(store.default_version().as_deref(), Some("v1"));
    let kernel = store.artifact("v1", "vmlinuz").unwrap();
    assert_eq!(std::fs::read(kernel).unwrap(), b"kernel");
    assert!(store.artifact("v1", "../state.db").is_none());
    assert!(store.artifact("../v1", "vmlinuz").is_none());
    // A second image does not move the default; the list is sorted.
    store.add(&image("v2", b"kernel2", b"initramfs2")).unwrap();
    assert_eq!(store.default_version().as_deref(), Some("v1"));
    let versions: Vec<String> = store
        .list()
        .unwrap()
        .into_iter()
        .map(|i| i.version)
        .collect();
    assert_eq!(versions, ["v1", "v2"]);
}

#[test]
fn the_key_is_made_once_and_kept_private() {
    let dir = tempfile::tempdir().unwrap();
    let first = ImageStore::open(dir.path()).unwrap().public_key_hex();
    assert_eq!(first.len(), 64);
    assert_eq!(
        ImageStore::open(dir.path()).unwrap().public_key_hex(),
        first
    );
    let mode = std::fs::metadata(dir.path().join("master-signing.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    std::fs::write(dir.path().join("master-signing.key"), "junk").unwrap();
    assert!(ImageStore::open(dir.path()).is_err());
}

#[test]
fn images_that_do_not_match_their_manifest_are_refused_whole() {
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(dir.path()).unwrap();
    let mut corrupt = image("v1", b"kernel", b"initramfs");
    corrupt[1].1 = b"kernel".iter().rev().copied().collect();
    let e = store.add(&corrupt).unwrap_err().to_string();
    assert!(e.contains("vmlinuz: sha256"), "{e}");
    let mut short = image("v1", b"kernel", b"initramfs");
    short[2].1.pop();
    let e = store.add(&short).unwrap_err().to_string();
    assert!(e.contains("initramfs.cpio.gz: 8 bytes"), "{e}");
    let mut missing = image("v1", b"kernel", b"initramfs");
    missing.remove(1);
    assert!(
        store
            .add(&missing)
            .unwrap_err()
            .to_string()
            .contains("vmlinuz is missing")
    );
    let mut extra = image("v1", b"kernel", b"initramfs");
    extra.push(("../evil".into(), vec![]));
    assert!(store.add(&extra).is_err());
    let e = store
        .add(&image("../x", b"k", b"i"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("version"), "{e}");
    // Nothing of the refused ones was kept.
    assert!(store.list().unwrap().is_empty());
    assert_eq!(store.default_version(), None);
    store.add(&image("v1", b"kernel", b"initramfs")).unwrap();
    assert!(matches!(
        store
            .add(&image("v1", b"kernel", b"initramfs"))
            .unwrap_err(),
        ImageError::Exists(_)
    ));
}

//! The whole `cellimg build` pipeline (minus the ISO, which needs grub) run twice on the
//! same inputs: the initramfs and the manifest must come out byte-identical. Uses the
//! host's /bin/busybox (Debian's busybox-static), as a real build does.

use std::path::Path;

use cellimg::build::{BuildOptions, INITRAMFS_DIR, build, sha256_hex};

/// The smallest file the static-ELF check accepts: an ELF64 x86-64 header and one
/// PT_LOAD program header.
fn static_elf() -> Vec<u8> {
    let mut bytes = vec![0u8; 64 + 56];
    bytes[..4].copy_from_slice(b"\x7fELF");
    bytes[4] = 2;
    bytes[5] = 1;
    bytes[16] = 2;
    bytes[18] = 62;
    bytes[32] = 64;
    bytes[54] = 56;
    bytes[56] = 1;
    bytes[64] = 1;
    bytes
}

fn fake_kernel(dir: &Path) -> std::path::PathBuf {
    let mut bytes = vec![0u8; 0x400];
    bytes[0x202..0x206].copy_from_slice(b"HdrS");
    std::fs::write(dir.join("bzImage"), bytes).unwrap();
    std::fs::write(dir.join(".config"), "CONFIG_64BIT=y\n").unwrap();
    dir.join("bzImage")
}

fn options(inputs: &Path, out: &Path) -> BuildOptions {
    BuildOptions {
        out: out.to_owned(),
        version: "1.0.0".into(),
        celld: inputs.join("celld"),
        celld_version: Some("0.1.0".into()),
        kernel: Some(inputs.join("bzImage")),
        kernel_config: None,
        cmdline: vec!["celld.master=10.0.2.2:7000".into()],
        busybox: "/bin/busybox".into(),
        initramfs_dir: INITRAMFS_DIR.into(),
        source_date_epoch: 0,
        iso: false,
    }
}

#[test]
fn two_builds_of_the_same_inputs_are_byte_identical() {
    assert!(
        Path::new("/bin/busybox").exists(),
        "/bin/busybox is missing: apt-get install -y busybox-static"
    );
    let inputs = tempfile::tempdir().unwrap();
    std::fs::write(inputs.path().join("celld"), static_elf()).unwrap();
    fake_kernel(inputs.path());
    let (first, second) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    build(&options(inputs.path(), first.path())).unwrap();
    build(&options(inputs.path(), second.path())).unwrap();

    for name in [
        "initramfs.cpio.gz",
        "vmlinuz",
        "pxe/boot.ipxe",
        "manifest.json",
    ] {
        let a = std::fs::read(first.path().join(name)).unwrap();
        let b = std::fs::read(second.path().join(name)).unwrap();
        assert!(
            a == b,
            "{name} differs between two builds of the same inputs"
        );
    }
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(first.path().join("manifest.json")).unwrap())
            .unwrap();
    let initramfs = std::fs::read(first.path().join("initramfs.cpio.gz")).unwrap();
    assert_eq!(
        manifest["artifacts"]["initramfs.cpio.gz"]["sha256"],
        sha256_hex(&initramfs)
    );
    assert_eq!(manifest["version"], "1.0.0");
    assert_eq!(manifest["celld_version"], "0.1.0");
    assert_eq!(
        manifest["kernel_config_sha256"],
        sha256_hex(b"CONFIG_64BIT=y\n")
    );
    let ipxe = std::fs::read_to_string(first.path().join("pxe/boot.ipxe")).unwrap();
    assert!(ipxe.contains("celld.image_version=1.0.0 celld.master=10.0.2.2:7000"));
}

#[test]
fn a_dynamic_celld_is_refused_naming_the_input() {
    let inputs = tempfile::tempdir().unwrap();
    let mut dynamic = static_elf();
    dynamic[64] = 3; // PT_INTERP
    std::fs::write(inputs.path().join("celld"), dynamic).unwrap();
    fake_kernel(inputs.path());
    let out = tempfile::tempdir().unwrap();
    let err = build(&options(inputs.path(), out.path())).unwrap_err();
    assert!(format!("{err:#}").contains("--celld"), "{err:#}");
    assert!(!out.path().join("manifest.json").exists());
}

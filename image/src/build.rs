//! `cellimg build`: checks every input, then writes the artifacts in order (initramfs,
//! kernel, iPXE script, ISO) and finally manifest.json, which describes what was written.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::boot::{self, INITRAMFS_NAME, KERNEL_NAME};
use crate::{elf, initramfs};

/// The script that builds and caches the kernel when no --kernel is given.
pub const BUILD_KERNEL_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/build-kernel.sh");
/// The initramfs data directory of this checkout.
pub const INITRAMFS_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../initramfs");

#[derive(Clone, Debug)]
pub struct BuildOptions {
    pub out: PathBuf,
    pub version: String,
    pub celld: PathBuf,
    /// Recorded in the manifest. cellimg never runs the celld it packs (it may be an init
    /// that does something drastic when started outside a VM), so the version is given.
    pub celld_version: Option<String>,
    pub kernel: Option<PathBuf>,
    pub kernel_config: Option<PathBuf>,
    pub cmdline: Vec<String>,
    pub busybox: PathBuf,
    pub initramfs_dir: PathBuf,
    /// The mtime of every initramfs entry (SOURCE_DATE_EPOCH).
    pub source_date_epoch: u32,
    pub iso: bool,
}

#[derive(Serialize)]
struct Manifest<'a> {
    version: &'a str,
    celld_version: &'a str,
    kernel_cmdline: &'a str,
    kernel_config_sha256: String,
    artifacts: BTreeMap<String, Artifact>,
}

#[derive(Serialize)]
struct Artifact {
    sha256: String,
    size: u64,
}

pub fn build(options: &BuildOptions) -> Result<()> {
    boot::check_version(&options.version, "--version")?;
    let celld_version = options.celld_version.as_deref().unwrap_or("unknown");
    if let Some(version) = &options.celld_version {
        boot::check_version(version, "--celld-version")?;
    }
    let cmdline = boot::kernel_cmdline(&options.version, &options.cmdline)?;

    let celld = read_input(&options.celld, "--celld")?;
    elf::check_static_x86_64(&celld, &format!("--celld {}", options.celld.display()))?;
    let busybox = read_input(&options.busybox, "--busybox")?;
    elf::check_static_x86_64(
        &busybox,
        &format!("--busybox {}", options.busybox.display()),
    )?;
    let applets = busybox_applets(&options.busybox)?;

    let kernel_path = match &options.kernel {
        Some(path) => path.clone(),
        None => build_kernel()?,
    };
    let kernel = read_input(&kernel_path, "--kernel")?;
    // Every x86 bzImage carries the "HdrS" boot protocol signature at 0x202.
    if kernel.get(0x202..0x206) != Some(b"HdrS".as_slice()) {
        bail!(
            "--kernel {} is not an x86 bzImage (no 'HdrS' boot header)",
            kernel_path.display()
        );
    }
    let kernel_config_path = match &options.kernel_config {
        Some(path) => path.clone(),
        None => kernel_path.with_file_name(".config"),
    };
    let kernel_config = std::fs::read(&kernel_config_path).with_context(|| {
        format!(
            "cannot read the kernel config {}: pass --kernel-config PATH, the .config the \
             kernel was built from (its hash goes into manifest.json)",
            kernel_config_path.display()
        )
    })?;

    let skeleton_path = options.initramfs_dir.join("skeleton.txt");
    let skeleton_text = std::fs::read_to_string(&skeleton_path).with_context(|| {
        format!(
            "cannot read {}: pass --initramfs DIR, the initramfs/ directory of the checkout",
            skeleton_path.display()
        )
    })?;
    let skeleton = initramfs::parse_skeleton(&skeleton_text, &skeleton_path.display().to_string())?;
    let skeleton_files = initramfs::read_skeleton_files(&skeleton, &options.initramfs_dir)?;
    let archive = initramfs::assemble(&initramfs::Inputs {
        init: celld,
        skeleton,
        skeleton_files,
        busybox,
        applets,
    })?;
    let initramfs_gz = initramfs::gzip(&archive, options.source_date_epoch)?;

    let out = &options.out;
    std::fs::create_dir_all(out.join("pxe"))
        .with_context(|| format!("cannot create the output directory {}", out.display()))?;
    // The manifest is written last and vouches for the rest; an old one must not survive
    // a build that fails half way.
    remove_if_present(&out.join("manifest.json"))?;
    write_output(out, INITRAMFS_NAME, &initramfs_gz)?;
    write_output(out, KERNEL_NAME, &kernel)?;
    write_output(out, "pxe/boot.ipxe", boot::ipxe_script(&cmdline).as_bytes())?;
    let mut artifact_names = vec![KERNEL_NAME, INITRAMFS_NAME, "pxe/boot.ipxe"];
    if options.iso {
        boot::make_iso(
            &out.join(KERNEL_NAME),
            &out.join(INITRAMFS_NAME),
            &boot::grub_cfg(&options.version, &cmdline),
            &out.join("node.iso"),
            options.source_date_epoch,
        )?;
        artifact_names.push("node.iso");
    } else {
        // A stale ISO from an earlier build must not pass as part of this one.
        remove_if_present(&out.join("node.iso"))?;
    }

    let mut artifacts = BTreeMap::new();
    for name in artifact_names {
        let bytes = std::fs::read(out.join(name))
            .with_context(|| format!("cannot read back {}", out.join(name).display()))?;
        artifacts.insert(
            name.to_owned(),
            Artifact {
                sha256: sha256_hex(&bytes),
                size: bytes.len() as u64,
            },
        );
    }
    let manifest = Manifest {
        version: &options.version,
        celld_version,
        kernel_cmdline: &cmdline,
        kernel_config_sha256: sha256_hex(&kernel_config),
        artifacts,
    };
    let mut json = serde_json::to_vec_pretty(&manifest).context("cannot encode manifest.json")?;
    json.push(b'\n');
    write_output(out, "manifest.json", &json)?;
    Ok(())
}

fn read_input(path: &Path, option: &str) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {option} {}", path.display()))
}

fn write_output(out: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let path = out.join(name);
    std::fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))
}

fn remove_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
            Err(err).with_context(|| format!("cannot remove stale {}", path.display()))
        }
        _ => Ok(()),
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Busybox knows its own applets; asking it keeps the rootfs in step with the binary.
fn busybox_applets(busybox: &Path) -> Result<Vec<String>> {
    let output = Command::new(busybox)
        .arg("--list")
        .output()
        .with_context(|| format!("cannot run --busybox {} --list", busybox.display()))?;
    if !output.status.success() {
        bail!(
            "--busybox {} --list failed ({}): is it Debian's busybox-static?",
            busybox.display(),
            output.status
        );
    }
    let list = String::from_utf8(output.stdout)
        .with_context(|| format!("--busybox {} --list is not UTF-8", busybox.display()))?;
    let applets: Vec<String> = list
        .lines()
        .map(str::trim)
        .filter(|name| !name.is_empty() && *name != "busybox")
        .map(str::to_owned)
        .collect();
    if applets.is_empty() {
        bail!("--busybox {} lists no applets", busybox.display());
    }
    Ok(applets)
}

/// Runs image/build-kernel.sh (instant when its cache is warm); its last line of stdout is
/// the bzImage path, with .config beside it.
fn build_kernel() -> Result<PathBuf> {
    eprintln!("cellimg: no --kernel given, running {BUILD_KERNEL_SCRIPT}");
    let output = Command::new("bash")
        .arg(BUILD_KERNEL_SCRIPT)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {BUILD_KERNEL_SCRIPT}: pass --kernel PATH"))?;
    if !output.status.success() {
        bail!(
            "no kernel: {BUILD_KERNEL_SCRIPT} failed ({}); fix it or pass --kernel PATH",
            output.status
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let path = stdout
        .lines()
        .last()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .with_context(|| format!("no kernel: {BUILD_KERNEL_SCRIPT} printed no path"))?;
    Ok(PathBuf::from(path))
}

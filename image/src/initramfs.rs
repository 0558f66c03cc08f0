//! Assembles the initramfs: /init (celld), the skeleton from `initramfs/skeleton.txt`,
//! and the busybox task rootfs at /rootfs/busybox; then writes it as a gzip'd newc cpio.
//!
//! Everything that goes in arrives as bytes and names in [`Inputs`]; nothing here runs
//! programs or reads host metadata, so the same inputs give the same bytes.

use std::path::Path;

use anyhow::{Context, Result, bail};
use flate2::{Compression, GzBuilder};

use crate::cpio::Archive;

/// Where the busybox task rootfs lives in the image.
pub const BUSYBOX_ROOTFS: &str = "rootfs/busybox";

/// One line of `initramfs/skeleton.txt`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SkeletonEntry {
    Dir {
        path: String,
        mode: u32,
    },
    CharDev {
        path: String,
        mode: u32,
        major: u32,
        minor: u32,
    },
    File {
        path: String,
        mode: u32,
        source: String,
    },
}

/// Parses skeleton.txt. `origin` names the file in error messages.
pub fn parse_skeleton(text: &str, origin: &str) -> Result<Vec<SkeletonEntry>> {
    let mut entries = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = || format!("{origin}:{}", number + 1);
        let words: Vec<&str> = line.split_whitespace().collect();
        let mode = |word: Option<&&str>| -> Result<u32> {
            let word = word.with_context(|| format!("{}: missing mode", at()))?;
            u32::from_str_radix(word, 8)
                .ok()
                .filter(|m| *m <= 0o7777)
                .with_context(|| format!("{}: mode '{word}' is not octal like 0755", at()))
        };
        let number_at = |index: usize| -> Result<u32> {
            let word = words
                .get(index)
                .with_context(|| format!("{}: missing device number", at()))?;
            word.parse()
                .with_context(|| format!("{}: device number '{word}' is not a number", at()))
        };
        let entry = match words.as_slice() {
            ["dir", path, _] => SkeletonEntry::Dir {
                path: (*path).to_owned(),
                mode: mode(words.get(2))?,
            },
            ["nod", path, _, "c", _, _] => SkeletonEntry::CharDev {
                path: (*path).to_owned(),
                mode: mode(words.get(2))?,
                major: number_at(4)?,
                minor: number_at(5)?,
            },
            ["file", path, _, source] => SkeletonEntry::File {
                path: (*path).to_owned(),
                mode: mode(words.get(2))?,
                source: (*source).to_owned(),
            },
            _ => bail!(
                "{}: cannot read '{line}': expected 'dir PATH MODE', \
                 'nod PATH MODE c MAJOR MINOR' or 'file PATH MODE SOURCE'",
                at()
            ),
        };
        entries.push(entry);
    }
    Ok(entries)
}

/// Everything the initramfs is made of, already read into memory.
pub struct Inputs {
    /// The static celld binary, installed as /init.
    pub init: Vec<u8>,
    pub skeleton: Vec<SkeletonEntry>,
    /// Contents of each `file` source named by the skeleton, by source name.
    pub skeleton_files: Vec<(String, Vec<u8>)>,
    /// The static busybox binary of the task rootfs.
    pub busybox: Vec<u8>,
    /// Applet names from `busybox --list`; each becomes /bin/NAME -> busybox.
    pub applets: Vec<String>,
}

/// Reads the contents of every `file` entry of the skeleton from `dir`.
pub fn read_skeleton_files(
    skeleton: &[SkeletonEntry],
    dir: &Path,
) -> Result<Vec<(String, Vec<u8>)>> {
    let mut files = Vec::new();
    for entry in skeleton {
        if let SkeletonEntry::File { source, .. } = entry {
            let path = dir.join(source);
            let bytes = std::fs::read(&path)
                .with_context(|| format!("cannot read initramfs file {}", path.display()))?;
            files.push((source.clone(), bytes));
        }
    }
    Ok(files)
}

/// Builds the archive from the inputs.
pub fn assemble(inputs: &Inputs) -> Result<Archive> {
    let mut archive = Archive::new();
    archive.add_file("init", 0o755, inputs.init.clone())?;
    for entry in &inputs.skeleton {
        match entry {
            SkeletonEntry::Dir { path, mode } => archive.add_dir(path, *mode)?,
            SkeletonEntry::CharDev {
                path,
                mode,
                major,
                minor,
            } => archive.add_char_dev(path, *mode, *major, *minor)?,
            SkeletonEntry::File { path, mode, source } => {
                let bytes = inputs
                    .skeleton_files
                    .iter()
                    .find(|(name, _)| name == source)
                    .map(|(_, bytes)| bytes.clone())
                    .with_context(|| format!("skeleton file '{source}' was not read"))?;
                archive.add_file(path, *mode, bytes)?;
            }
        }
    }
    add_busybox_rootfs(&mut archive, inputs)?;
    Ok(archive)
}

fn add_busybox_rootfs(archive: &mut Archive, inputs: &Inputs) -> Result<()> {
    let root = BUSYBOX_ROOTFS;
    archive.add_file(
        &format!("{root}/bin/busybox"),
        0o755,
        inputs.busybox.clone(),
    )?;
    for applet in &inputs.applets {
        let valid = !applet.is_empty()
            && applet != "busybox"
            && applet
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.[".contains(c));
        if !valid {
            bail!("busybox applet name '{applet}' is not a plain file name");
        }
        archive.add_symlink(&format!("{root}/bin/{applet}"), "busybox")?;
    }
    // Empty mount points: celld mounts the task's /proc, /dev, /tmp and /sys onto these,
    // and a read-only rootfs cannot grow them at run time.
    for (dir, mode) in [
        ("proc", 0o555),
        ("dev", 0o755),
        ("tmp", 0o1777),
        ("sys", 0o555),
        ("etc", 0o755),
    ] {
        archive.add_dir(&format!("{root}/{dir}"), mode)?;
    }
    Ok(())
}

/// gzip with a fixed header: no file name, mtime 0, fixed level, so the compressed bytes
/// depend on the archive only.
pub fn gzip(archive: &Archive, mtime: u32) -> Result<Vec<u8>> {
    let mut encoder = GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), Compression::best());
    archive
        .write_to(&mut encoder, mtime)
        .context("cannot write the initramfs cpio")?;
    encoder.finish().context("cannot gzip the initramfs")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SKELETON: &str = "\
# comment
dir /dev 0755
dir /tmp 1777
dir /sys/fs/cgroup 0555
nod /dev/console 0600 c 5 1
file /etc/celld/node.toml 0644 node.toml
";

    fn inputs() -> Inputs {
        Inputs {
            init: b"\x7fELF-celld".to_vec(),
            skeleton: parse_skeleton(SKELETON, "skeleton.txt").unwrap(),
            skeleton_files: vec![("node.toml".into(), b"[sysctls]\n".to_vec())],
            busybox: b"\x7fELF-busybox".to_vec(),
            applets: vec!["sh".into(), "ls".into(), "[".into()],
        }
    }

    #[test]
    fn two_builds_from_the_same_inputs_are_byte_identical() {
        let first = gzip(&assemble(&inputs()).unwrap(), 0).unwrap();
        let second = gzip(&assemble(&inputs()).unwrap(), 0).unwrap();
        assert_eq!(first, second);
        // Applets listed in another order still give the same image.
        let mut shuffled = inputs();
        shuffled.applets.reverse();
        assert_eq!(first, gzip(&assemble(&shuffled).unwrap(), 0).unwrap());
        // gzip header: magic, deflate, no flags (no name), mtime 0.
        assert_eq!(&first[..8], &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn holds_init_skeleton_and_busybox_rootfs() {
        let archive = assemble(&inputs()).unwrap();
        let paths: Vec<&str> = archive.paths().collect();
        for wanted in [
            "init",
            "dev/console",
            "tmp",
            "sys/fs/cgroup",
            "etc/celld/node.toml",
            "rootfs/busybox/bin/busybox",
            "rootfs/busybox/bin/sh",
            "rootfs/busybox/bin/[",
            "rootfs/busybox/proc",
            "rootfs/busybox/dev",
            "rootfs/busybox/tmp",
            "rootfs/busybox/sys",
            "rootfs/busybox/etc",
        ] {
            assert!(paths.contains(&wanted), "{wanted} missing from {paths:?}");
        }
    }

    #[test]
    fn skeleton_errors_name_the_line() {
        let err = parse_skeleton("dir /a 0755\ndir /b rwx\n", "sk.txt").unwrap_err();
        assert!(err.to_string().contains("sk.txt:2"), "{err}");
        let err = parse_skeleton("link /a /b\n", "sk.txt").unwrap_err();
        assert!(err.to_string().contains("sk.txt:1"), "{err}");
    }

    #[test]
    fn refuses_odd_applet_names() {
        let mut bad = inputs();
        bad.applets.push("../../init".into());
        assert!(assemble(&bad).is_err());
    }
}

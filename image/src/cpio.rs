//! A deterministic writer of "newc" cpio archives, the format the kernel unpacks as
//! initramfs.
//!
//! Determinism is the point of this room: entries are written sorted by path (a parent
//! always sorts before its children, because a prefix sorts first), every entry gets the
//! same mtime, uid and gid are 0, inode numbers are handed out in that order, and nothing
//! is read from the build host's file metadata. Two archives of the same entries are
//! byte-identical. This module does no I/O besides writing to the given sink.

use std::collections::BTreeMap;
use std::io::{self, Write};

use anyhow::{Result, bail};

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;
const TRAILER: &str = "TRAILER!!!";

/// What an archive entry is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File(Vec<u8>),
    Symlink(String),
    /// A character device node, e.g. /dev/console (5, 1), which the kernel opens for
    /// init's stdio before anything could mount devtmpfs.
    CharDev {
        major: u32,
        minor: u32,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    /// Permission bits only (including setuid/sticky); the type comes from `kind`.
    perm: u32,
    kind: Kind,
}

/// An in-memory archive: a map from relative path ("etc/celld/node.toml") to entry.
#[derive(Clone, Debug, Default)]
pub struct Archive {
    entries: BTreeMap<String, Entry>,
}

impl Archive {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a directory and any missing parents (0755). Adding an existing directory
    /// again updates its mode.
    pub fn add_dir(&mut self, path: &str, perm: u32) -> Result<()> {
        self.insert(path, perm, Kind::Dir)
    }

    pub fn add_file(&mut self, path: &str, perm: u32, data: Vec<u8>) -> Result<()> {
        self.insert(path, perm, Kind::File(data))
    }

    pub fn add_symlink(&mut self, path: &str, target: &str) -> Result<()> {
        if target.is_empty() {
            bail!("cpio entry '{path}': symlink target is empty");
        }
        self.insert(path, 0o777, Kind::Symlink(target.to_owned()))
    }

    pub fn add_char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> Result<()> {
        self.insert(path, perm, Kind::CharDev { major, minor })
    }

    /// Paths in archive order.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    fn insert(&mut self, path: &str, perm: u32, kind: Kind) -> Result<()> {
        let path = normalize(path)?;
        if perm & !0o7777 != 0 {
            bail!("cpio entry '{path}': mode {perm:o} has bits beyond permissions");
        }
        // Parents first, so the kernel never has to create a directory implicitly
        // (it does not: a file whose parent is missing is dropped with a warning).
        let mut parent = String::new();
        let components: Vec<&str> = path.split('/').collect();
        for component in &components[..components.len() - 1] {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(component);
            match self.entries.get(&parent) {
                Some(Entry {
                    kind: Kind::Dir, ..
                }) => {}
                Some(_) => bail!("cpio entry '{path}': parent '{parent}' is not a directory"),
                None => {
                    self.entries.insert(
                        parent.clone(),
                        Entry {
                            perm: 0o755,
                            kind: Kind::Dir,
                        },
                    );
                }
            }
        }
        match self.entries.get(&path) {
            Some(existing) if existing.kind != Kind::Dir || kind != Kind::Dir => {
                bail!("cpio entry '{path}' is added twice")
            }
            _ => {}
        }
        self.entries.insert(path, Entry { perm, kind });
        Ok(())
    }

    /// Writes the archive in newc format with every mtime set to `mtime`.
    pub fn write_to<W: Write>(&self, out: &mut W, mtime: u32) -> io::Result<()> {
        let mut counter = CountingWriter {
            inner: out,
            written: 0,
        };
        for (ino, (path, entry)) in (1u32..).zip(&self.entries) {
            let (mode, nlink, data, rdev): (u32, u32, &[u8], (u32, u32)) = match &entry.kind {
                Kind::Dir => (S_IFDIR | entry.perm, 2, &[], (0, 0)),
                Kind::File(data) => (S_IFREG | entry.perm, 1, data, (0, 0)),
                Kind::Symlink(target) => (S_IFLNK | entry.perm, 1, target.as_bytes(), (0, 0)),
                Kind::CharDev { major, minor } => (S_IFCHR | entry.perm, 1, &[], (*major, *minor)),
            };
            let header = Header {
                ino,
                mode,
                nlink,
                mtime,
                filesize: data.len(),
                rdev,
            };
            header.write(&mut counter, path)?;
            counter.write_all(data)?;
            counter.pad4()?;
        }
        let trailer = Header {
            ino: 0,
            mode: 0,
            nlink: 1,
            mtime: 0,
            filesize: 0,
            rdev: (0, 0),
        };
        trailer.write(&mut counter, TRAILER)?;
        counter.flush()
    }

    /// The archive as bytes.
    pub fn to_bytes(&self, mtime: u32) -> Vec<u8> {
        let mut bytes = Vec::new();
        // Writing to a Vec cannot fail.
        let _ = self.write_to(&mut bytes, mtime);
        bytes
    }
}

struct Header {
    ino: u32,
    mode: u32,
    nlink: u32,
    mtime: u32,
    filesize: usize,
    rdev: (u32, u32),
}

impl Header {
    fn write<W: Write>(&self, out: &mut CountingWriter<W>, name: &str) -> io::Result<()> {
        let filesize = u32::try_from(self.filesize).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cpio entry '{name}' is larger than 4 GiB, which newc cannot hold"),
            )
        })?;
        // The name size counts the terminating NUL.
        let namesize = name.len() + 1;
        let fields = [
            self.ino,
            self.mode,
            0, // uid
            0, // gid
            self.nlink,
            self.mtime,
            filesize,
            0, // devmajor of the archive's filesystem: meaningless here
            0, // devminor
            self.rdev.0,
            self.rdev.1,
            namesize as u32,
            0, // check: only used by the "crc" variant
        ];
        let mut header = String::with_capacity(110);
        header.push_str("070701");
        for field in fields {
            header.push_str(&format!("{field:08X}"));
        }
        out.write_all(header.as_bytes())?;
        out.write_all(name.as_bytes())?;
        out.write_all(&[0])?;
        out.pad4()
    }
}

/// Tracks the offset so header+name and data can be padded to 4 bytes as newc requires.
struct CountingWriter<W> {
    inner: W,
    written: usize,
}

impl<W: Write> CountingWriter<W> {
    fn pad4(&mut self) -> io::Result<()> {
        let pad = (4 - self.written % 4) % 4;
        self.write_all(&[0u8; 3][..pad])
    }
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// "/etc//celld/" -> "etc/celld"; refuses empty paths, "." and ".." so no entry can land
/// outside the archive root.
fn normalize(path: &str) -> Result<String> {
    let components: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    if components.is_empty() {
        bail!("cpio entry path '{path}' is empty");
    }
    if components.iter().any(|c| *c == "." || *c == "..") {
        bail!("cpio entry path '{path}' contains '.' or '..'");
    }
    if path.contains('\0') {
        bail!("cpio entry path {path:?} contains a NUL byte");
    }
    Ok(components.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Archive {
        let mut archive = Archive::new();
        archive
            .add_file("/init", 0o755, b"\x7fELF".to_vec())
            .unwrap();
        archive.add_dir("/tmp", 0o1777).unwrap();
        archive.add_symlink("rootfs/bin/sh", "busybox").unwrap();
        archive.add_char_dev("dev/console", 0o600, 5, 1).unwrap();
        archive
            .add_file("etc/celld/node.toml", 0o644, b"[sysctls]\n".to_vec())
            .unwrap();
        archive
    }

    /// Parses newc back into (name, mode, mtime, uid, gid, data) to check what we wrote.
    fn parse(bytes: &[u8]) -> Vec<(String, u32, u32, u32, u32, Vec<u8>)> {
        let field = |at: usize, i: usize| {
            let s = std::str::from_utf8(&bytes[at + 6 + i * 8..at + 14 + i * 8]).unwrap();
            u32::from_str_radix(s, 16).unwrap()
        };
        let mut out = Vec::new();
        let mut at = 0;
        loop {
            assert_eq!(&bytes[at..at + 6], b"070701", "magic at offset {at}");
            let (mode, uid, gid, mtime) = (field(at, 1), field(at, 2), field(at, 3), field(at, 5));
            let filesize = field(at, 6) as usize;
            let namesize = field(at, 11) as usize;
            let name = std::str::from_utf8(&bytes[at + 110..at + 110 + namesize - 1])
                .unwrap()
                .to_owned();
            let data_at = (at + 110 + namesize).div_ceil(4) * 4;
            let data = bytes[data_at..data_at + filesize].to_vec();
            at = (data_at + filesize).div_ceil(4) * 4;
            if name == TRAILER {
                assert_eq!(at, bytes.len(), "nothing after the trailer");
                return out;
            }
            out.push((name, mode, mtime, uid, gid, data));
        }
    }

    #[test]
    fn same_entries_in_any_order_give_identical_bytes() {
        let mut reversed = Archive::new();
        reversed
            .add_file("etc/celld/node.toml", 0o644, b"[sysctls]\n".to_vec())
            .unwrap();
        reversed.add_char_dev("dev/console", 0o600, 5, 1).unwrap();
        reversed.add_symlink("rootfs/bin/sh", "busybox").unwrap();
        reversed.add_dir("tmp", 0o1777).unwrap();
        reversed
            .add_file("init", 0o755, b"\x7fELF".to_vec())
            .unwrap();
        assert_eq!(sample().to_bytes(0), reversed.to_bytes(0));
        assert_eq!(sample().to_bytes(7), sample().to_bytes(7));
        assert_ne!(sample().to_bytes(0), sample().to_bytes(1));
    }

    #[test]
    fn entries_are_sorted_with_parents_first_and_metadata_fixed() {
        let entries = parse(&sample().to_bytes(1_700_000_000));
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "dev",
                "dev/console",
                "etc",
                "etc/celld",
                "etc/celld/node.toml",
                "init",
                "rootfs",
                "rootfs/bin",
                "rootfs/bin/sh",
                "tmp"
            ]
        );
        for (name, _, mtime, uid, gid, _) in &entries {
            assert_eq!((*mtime, *uid, *gid), (1_700_000_000, 0, 0), "{name}");
        }
        let mode = |n: &str| entries.iter().find(|e| e.0 == n).unwrap().1;
        assert_eq!(mode("init"), S_IFREG | 0o755);
        assert_eq!(mode("tmp"), S_IFDIR | 0o1777);
        assert_eq!(mode("rootfs/bin/sh"), S_IFLNK | 0o777);
        assert_eq!(mode("dev/console"), S_IFCHR | 0o600);
        let data = |n: &str| entries.iter().find(|e| e.0 == n).unwrap().5.clone();
        assert_eq!(data("rootfs/bin/sh"), b"busybox");
        assert_eq!(data("etc/celld/node.toml"), b"[sysctls]\n");
    }

    #[test]
    fn refuses_paths_escaping_the_root_and_duplicates() {
        let mut archive = Archive::new();
        assert!(archive.add_dir("../etc", 0o755).is_err());
        assert!(archive.add_dir("/", 0o755).is_err());
        archive.add_file("a", 0o644, vec![]).unwrap();
        assert!(archive.add_file("a", 0o644, vec![]).is_err());
        assert!(archive.add_file("a/b", 0o644, vec![]).is_err());
        assert!(archive.add_file("b", 0o100_644, vec![]).is_err());
    }
}

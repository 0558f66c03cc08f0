//! cellimg: turns a kernel, the static celld binary and the `initramfs/` tree into the
//! boot artifacts of a node image (vmlinuz, initramfs.cpio.gz, node.iso, pxe/boot.ipxe,
//! manifest.json). It never links the agent: celld arrives as a file.
//!
//! # Layout
//!
//! - [`cpio`]: the deterministic newc writer.
//! - [`elf`]: the "is this a static x86-64 executable" check for /init.
//! - [`initramfs`]: what goes into the initramfs, and its gzip framing.
//! - [`boot`]: kernel command line, GRUB config, iPXE script, the ISO.
//! - [`build`]: `cellimg build`, the steps in order, and manifest.json.
//! - [`cli`]: the command line of the binary.

pub mod boot;
pub mod build;
pub mod cli;
pub mod cpio;
pub mod elf;
pub mod initramfs;

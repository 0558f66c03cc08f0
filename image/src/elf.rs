//! Checks that a binary can run as /init of the image: a 64-bit x86-64 ELF executable
//! without a program interpreter. The initramfs holds no dynamic loader and no libc, so a
//! dynamically linked celld would make the kernel panic at boot with "No working init
//! found"; refusing it here turns that into a build error that names the file.

use anyhow::{Result, bail};

const PT_INTERP: u32 = 3;
const EM_X86_64: u16 = 62;
const ET_EXEC: u16 = 2;
const ET_DYN: u16 = 3;

/// Fails unless `bytes` is a static (or static-pie) x86-64 ELF executable. `what` names
/// the input in the message, e.g. "--celld /path/to/celld".
pub fn check_static_x86_64(bytes: &[u8], what: &str) -> Result<()> {
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" {
        bail!("{what} is not an ELF executable");
    }
    if bytes[4] != 2 || bytes[5] != 1 {
        bail!("{what} is not a 64-bit little-endian ELF: build it for x86_64");
    }
    let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
    let e_type = u16_at(16);
    if e_type != ET_EXEC && e_type != ET_DYN {
        bail!("{what} is an ELF file but not an executable (e_type {e_type})");
    }
    if u16_at(18) != EM_X86_64 {
        bail!("{what} is built for ELF machine {}, not x86_64", u16_at(18));
    }
    let mut phoff = [0u8; 8];
    phoff.copy_from_slice(&bytes[32..40]);
    let phoff = u64::from_le_bytes(phoff);
    let phentsize = usize::from(u16_at(54));
    let phnum = usize::from(u16_at(56));
    if phnum == 0 || phentsize < 4 {
        bail!("{what} has no program headers, so the kernel cannot run it");
    }
    for index in 0..phnum {
        let at = usize::try_from(phoff)
            .ok()
            .and_then(|off| off.checked_add(index.checked_mul(phentsize)?))
            .filter(|at| at.checked_add(4).is_some_and(|end| end <= bytes.len()));
        let Some(at) = at else {
            bail!("{what} is a truncated ELF file (program header {index} is past the end)");
        };
        let p_type = u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
        if p_type == PT_INTERP {
            bail!(
                "{what} is dynamically linked (it has a PT_INTERP program header), but the \
                 image has no dynamic loader: build it static, e.g. for \
                 x86_64-unknown-linux-musl or with -C target-feature=+crt-static"
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 header with the given program header types.
    fn elf(machine: u16, program_headers: &[u32]) -> Vec<u8> {
        let mut bytes = vec![0u8; 64 + 56 * program_headers.len()];
        bytes[..4].copy_from_slice(b"\x7fELF");
        bytes[4] = 2;
        bytes[5] = 1;
        bytes[16..18].copy_from_slice(&ET_EXEC.to_le_bytes());
        bytes[18..20].copy_from_slice(&machine.to_le_bytes());
        bytes[32..40].copy_from_slice(&64u64.to_le_bytes());
        bytes[54..56].copy_from_slice(&56u16.to_le_bytes());
        bytes[56..58].copy_from_slice(&(program_headers.len() as u16).to_le_bytes());
        for (i, p_type) in program_headers.iter().enumerate() {
            bytes[64 + 56 * i..68 + 56 * i].copy_from_slice(&p_type.to_le_bytes());
        }
        bytes
    }

    #[test]
    fn accepts_static_and_refuses_dynamic_with_the_input_named() {
        check_static_x86_64(&elf(EM_X86_64, &[1, 1]), "--celld x").unwrap();
        let err = check_static_x86_64(&elf(EM_X86_64, &[6, PT_INTERP, 1]), "--celld x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("--celld x is dynamically linked"), "{err}");
    }

    #[test]
    fn refuses_scripts_foreign_machines_and_truncated_files() {
        let err = check_static_x86_64(b"#!/bin/sh\necho hi\n", "--celld s").unwrap_err();
        assert!(err.to_string().contains("not an ELF"), "{err}");
        assert!(check_static_x86_64(&elf(183, &[1]), "aarch64").is_err());
        let mut truncated = elf(EM_X86_64, &[1, 1]);
        truncated.truncate(100);
        assert!(check_static_x86_64(&truncated, "t").is_err());
    }
}

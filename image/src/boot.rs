//! The ways a node boots the same kernel and initramfs: the kernel command line they all
//! share, GRUB's configuration inside node.iso (BIOS and UEFI), and the iPXE script.
//! Text generation is pure; only [`make_iso`] runs a program (grub-mkrescue).

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Kernel and initramfs file names, the same in the output directory and on the ISO.
pub const KERNEL_NAME: &str = "vmlinuz";
pub const INITRAMFS_NAME: &str = "initramfs.cpio.gz";

/// Image versions go on the kernel command line and into file and menu names, so they are
/// kept to characters that need no quoting anywhere.
pub fn check_version(version: &str, what: &str) -> Result<()> {
    let valid = !version.is_empty()
        && version.len() <= 64
        && version
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._+-".contains(c));
    if !valid {
        bail!(
            "{what} '{version}' is not a valid version: use [A-Za-z0-9._+-], at most 64 characters"
        );
    }
    Ok(())
}

/// `console=ttyS0` for the serial log every path is tested by, `panic=-1` so a node whose
/// PID 1 dies reboots into PXE instead of hanging, `quiet` so the serial console is not
/// the boot's bottleneck; then the image version celld reports, then the extras.
pub fn kernel_cmdline(version: &str, extra: &[String]) -> Result<String> {
    let mut cmdline = format!("console=ttyS0 panic=-1 quiet celld.image_version={version}");
    for word in extra {
        // GRUB and iPXE both split on whitespace and treat quotes and ';' specially, so
        // only plain words are allowed through to keep the three paths identical.
        if word
            .chars()
            .any(|c| c.is_control() || "\"'`;$\\{}#".contains(c))
        {
            bail!("--cmdline '{word}' contains a character GRUB or iPXE would interpret");
        }
        for part in word.split_whitespace() {
            cmdline.push(' ');
            cmdline.push_str(part);
        }
    }
    Ok(cmdline)
}

/// GRUB's configuration: boot at once, talk on the serial port as well as the screen.
pub fn grub_cfg(version: &str, cmdline: &str) -> String {
    format!(
        "\
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
set timeout=0
set default=0
menuentry 'celld {version}' {{
    linux /boot/{KERNEL_NAME} {cmdline}
    initrd /boot/{INITRAMFS_NAME}
}}
"
    )
}

/// The iPXE script in `pxe/`. The kernel and initramfs are one directory up, named
/// relative to the script's own URL, so the same script works from TFTP and from HTTP
/// without knowing the server. `initrd=` names the initramfs for the kernel's EFI stub
/// when iPXE runs under UEFI; a BIOS boot ignores it.
pub fn ipxe_script(cmdline: &str) -> String {
    format!(
        "\
#!ipxe
initrd --name initrd ../{INITRAMFS_NAME}
kernel ../{KERNEL_NAME} initrd=initrd {cmdline}
boot
"
    )
}

/// Runs grub-mkrescue to make an ISO bootable by BIOS (El Torito, i386-pc) and UEFI
/// (an EFI system partition image, x86_64-efi).
pub fn make_iso(kernel: &Path, initramfs: &Path, grub_cfg: &str, iso: &Path) -> Result<()> {
    for (platform, package) in [
        ("/usr/lib/grub/i386-pc", "grub-pc-bin"),
        ("/usr/lib/grub/x86_64-efi", "grub-efi-amd64-bin"),
    ] {
        if !Path::new(platform).is_dir() {
            bail!(
                "{platform} is missing, so node.iso could not boot on that firmware: \
                 apt-get install -y {package}"
            );
        }
    }
    let staging = tempfile::tempdir().context("cannot create a staging directory for the ISO")?;
    let boot = staging.path().join("boot");
    std::fs::create_dir_all(boot.join("grub")).context("cannot create the ISO tree")?;
    std::fs::copy(kernel, boot.join(KERNEL_NAME))
        .with_context(|| format!("cannot copy {} into the ISO tree", kernel.display()))?;
    std::fs::copy(initramfs, boot.join(INITRAMFS_NAME))
        .with_context(|| format!("cannot copy {} into the ISO tree", initramfs.display()))?;
    std::fs::write(boot.join("grub/grub.cfg"), grub_cfg).context("cannot write grub.cfg")?;

    let output = Command::new("grub-mkrescue")
        // Fonts, locales and themes serve a graphical menu the serial console never
        // shows; leaving them out and xz-compressing modules takes the ISO from ~24 MB
        // to ~10 MB.
        .args(["--compress=xz", "--fonts=", "--locales=", "--themes="])
        .arg("-o")
        .arg(iso)
        .arg(staging.path())
        .output()
        .context(
            "cannot run grub-mkrescue: apt-get install -y grub-common grub-pc-bin \
             grub-efi-amd64-bin xorriso mtools",
        )?;
    if !output.status.success() {
        bail!(
            "grub-mkrescue failed ({}); it needs xorriso and mtools:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_has_defaults_version_and_extras() {
        let line =
            kernel_cmdline("1.2.3", &["celld.master=10.0.2.2:7000 loglevel=7".into()]).unwrap();
        assert_eq!(
            line,
            "console=ttyS0 panic=-1 quiet celld.image_version=1.2.3 \
             celld.master=10.0.2.2:7000 loglevel=7"
        );
        assert!(kernel_cmdline("1", &["a;reboot".into()]).is_err());
    }

    #[test]
    fn every_path_carries_the_same_cmdline() {
        let line = kernel_cmdline("v1", &[]).unwrap();
        assert!(grub_cfg("v1", &line).contains(&format!("linux /boot/vmlinuz {line}\n")));
        assert!(ipxe_script(&line).contains(&format!("kernel ../vmlinuz initrd=initrd {line}\n")));
        assert!(ipxe_script(&line).starts_with("#!ipxe\n"));
    }

    #[test]
    fn versions_are_plain_words() {
        check_version("2024.06.1-rc1", "--version").unwrap();
        for bad in ["", "a b", "v1;reboot", "ü"] {
            let err = check_version(bad, "--version").unwrap_err().to_string();
            assert!(err.starts_with("--version"), "{err}");
        }
    }
}

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
///
/// The ISO is made reproducible from `source_date_epoch`: every file date and the volume
/// UUID (from which the GPT disk GUID is derived) are fixed, and the one random value
/// xorriso cannot be told about, the FAT serial of the EFI image, is overwritten after.
pub fn make_iso(
    kernel: &Path,
    initramfs: &Path,
    grub_cfg: &str,
    iso: &Path,
    source_date_epoch: u32,
) -> Result<()> {
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

    // xorriso reads a date of 0 as "not given" and falls back to the current time for
    // the directories it makes, so the ISO's dates start one second later.
    let source_date_epoch = source_date_epoch.max(1);
    let output = Command::new("grub-mkrescue")
        // Fonts, locales and themes serve a graphical menu the serial console never
        // shows; leaving them out and xz-compressing modules takes the ISO from ~24 MB
        // to ~10 MB.
        .args(["--compress=xz", "--fonts=", "--locales=", "--themes="])
        .arg("-o")
        .arg(iso)
        .arg(staging.path())
        .arg("--")
        .args(["-volume_date", "all_file_dates"])
        .arg(format!("={source_date_epoch}"))
        .args(["-volume_date", "uuid"])
        .arg(volume_uuid(source_date_epoch))
        .args(["-boot_image", "any", "gpt_disk_guid=volume_date_uuid"])
        // xorriso takes the dates of the directories it creates itself from here.
        .env("SOURCE_DATE_EPOCH", source_date_epoch.to_string())
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
    fix_efi_image_serial(iso)
}

/// The volume UUID format of ISO 9660 is a date, "YYYYMMDDhhmmsscc", in UTC.
fn volume_uuid(epoch: u32) -> String {
    let (days, seconds) = (i64::from(epoch) / 86_400, i64::from(epoch) % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's days_from_civil, inverted).
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}{:02}{:02}{:02}00",
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60
    )
}

/// mformat (run by grub-mkrescue) gives the EFI system partition image a random FAT
/// volume serial; set it to a constant so two ISOs of the same inputs are identical.
/// Nothing checksums it: the ESP is found by GPT/El Torito position, not by serial.
fn fix_efi_image_serial(iso: &Path) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom, Write};

    let output = Command::new("xorriso")
        .args(["-indev"])
        .arg(iso)
        .args(["-find", "/efi.img", "-exec", "report_lba", "--"])
        .output()
        .context("cannot run xorriso to find efi.img in the ISO")?;
    let report = String::from_utf8_lossy(&output.stdout);
    // "File data lba:  0 ,       68 ,     1440 ,  2949120 , '/efi.img'"
    let lba: u64 = report
        .lines()
        .find(|line| line.starts_with("File data lba:") && line.contains("'/efi.img'"))
        .and_then(|line| line.split(',').nth(1))
        .and_then(|field| field.trim().parse().ok())
        .with_context(|| {
            format!(
                "xorriso did not report where efi.img is in {}",
                iso.display()
            )
        })?;

    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(iso)
        .with_context(|| format!("cannot open {}", iso.display()))?;
    let offset = lba * 2048;
    let mut boot_sector = [0u8; 512];
    file.seek(SeekFrom::Start(offset))
        .and_then(|_| file.read_exact(&mut boot_sector))
        .with_context(|| format!("cannot read efi.img's boot sector in {}", iso.display()))?;
    // FAT12/16 boot sector: extended boot signature 0x29 at 0x26, serial at 0x27.
    if boot_sector[510..512] != [0x55, 0xAA]
        || boot_sector[0x26] != 0x29
        || &boot_sector[0x36..0x39] != b"FAT"
    {
        bail!(
            "efi.img in {} is not the FAT12/16 image expected from grub-mkrescue",
            iso.display()
        );
    }
    file.seek(SeekFrom::Start(offset + 0x27))
        .and_then(|_| file.write_all(&0xCE11_D000u32.to_le_bytes()))
        .with_context(|| format!("cannot write efi.img's serial in {}", iso.display()))?;
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
    fn volume_uuid_is_the_utc_date_of_the_epoch() {
        assert_eq!(volume_uuid(0), "1970010100000000");
        assert_eq!(volume_uuid(1_700_000_000), "2023111422132000");
        assert_eq!(volume_uuid(951_825_600), "2000022912000000");
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

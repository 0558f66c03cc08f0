//! The command line of `cellimg`, parsed by hand: one subcommand and a handful of
//! `--name value` options do not need a parser crate. Parsing is pure so tests feed it
//! strings.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};

use crate::build::{self, BuildOptions};

pub const USAGE: &str = "\
usage: cellimg build --out DIR --version V --celld PATH [options]

Writes DIR/vmlinuz, initramfs.cpio.gz, node.iso, pxe/boot.ipxe and manifest.json.

  --out DIR              output directory (created if missing)
  --version V            image version, on the kernel command line as celld.image_version=V
  --celld PATH           the static celld binary, installed as /init
  --celld-version V      celld's version for manifest.json (default: unknown; cellimg
                         does not run the binary it packs)
  --kernel PATH          a bzImage (default: run image/build-kernel.sh, cached)
  --kernel-config PATH   the kernel's .config (default: .config beside --kernel)
  --cmdline WORDS        extra kernel command line (repeatable)
  --busybox PATH         static busybox for the task rootfs (default: /bin/busybox)
  --initramfs DIR        the initramfs data directory (default: this checkout's initramfs/)
  --no-iso               skip node.iso (no grub-mkrescue needed)

Environment: SOURCE_DATE_EPOCH sets the mtime of every initramfs entry (default 0).
";

/// Runs the command line (without the program name).
pub fn run(args: &[String], source_date_epoch: Option<&str>) -> Result<()> {
    match args.first().map(String::as_str) {
        Some("build") => {
            let options = parse_build(&args[1..], source_date_epoch)?;
            build::build(&options)?;
            println!("cellimg: wrote {}", options.out.display());
            Ok(())
        }
        Some("help" | "--help" | "-h") | None => {
            print!("{USAGE}");
            Ok(())
        }
        Some(other) => bail!("unknown command '{other}'\n\n{USAGE}"),
    }
}

pub fn parse_build(args: &[String], source_date_epoch: Option<&str>) -> Result<BuildOptions> {
    let mut out = None;
    let mut version = None;
    let mut celld = None;
    let mut options = BuildOptions {
        out: PathBuf::new(),
        version: String::new(),
        celld: PathBuf::new(),
        celld_version: None,
        kernel: None,
        kernel_config: None,
        cmdline: Vec::new(),
        busybox: PathBuf::from("/bin/busybox"),
        initramfs_dir: PathBuf::from(build::INITRAMFS_DIR),
        source_date_epoch: parse_epoch(source_date_epoch)?,
        iso: true,
    };
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        // Both "--name value" and "--name=value".
        let (name, inline) = match arg.split_once('=') {
            Some((name, value)) if arg.starts_with("--") => (name, Some(value.to_owned())),
            _ => (arg.as_str(), None),
        };
        if name == "--no-iso" {
            options.iso = false;
            continue;
        }
        if name == "--help" || name == "-h" {
            bail!("{USAGE}");
        }
        let known = [
            "--out",
            "--version",
            "--celld",
            "--celld-version",
            "--kernel",
            "--kernel-config",
            "--cmdline",
            "--busybox",
            "--initramfs",
        ];
        if !known.contains(&name) {
            bail!("unknown option '{arg}' for 'cellimg build'\n\n{USAGE}");
        }
        let value = match inline {
            Some(value) => value,
            None => rest
                .next()
                .cloned()
                .with_context(|| format!("option {name} needs a value"))?,
        };
        match name {
            "--out" => out = Some(PathBuf::from(value)),
            "--version" => version = Some(value),
            "--celld" => celld = Some(PathBuf::from(value)),
            "--celld-version" => options.celld_version = Some(value),
            "--kernel" => options.kernel = Some(PathBuf::from(value)),
            "--kernel-config" => options.kernel_config = Some(PathBuf::from(value)),
            "--cmdline" => options.cmdline.push(value),
            "--busybox" => options.busybox = PathBuf::from(value),
            _ => options.initramfs_dir = PathBuf::from(value),
        }
    }
    options.out = out.context("missing --out DIR: where to write the artifacts")?;
    options.version = version.context("missing --version V: the image version")?;
    options.celld = celld.context("missing --celld PATH: the static celld binary for /init")?;
    Ok(options)
}

fn parse_epoch(value: Option<&str>) -> Result<u32> {
    match value {
        None | Some("") => Ok(0),
        Some(text) => text.parse().with_context(|| {
            format!(
                "SOURCE_DATE_EPOCH '{text}' is not a number of seconds that newc can hold \
                 (0..=4294967295)"
            )
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_both_option_forms_and_repeats() {
        let options = parse_build(
            &strings(&[
                "--out",
                "o",
                "--version=1.0",
                "--celld",
                "c",
                "--cmdline",
                "a=1",
                "--cmdline",
                "b",
                "--no-iso",
            ]),
            Some("42"),
        )
        .unwrap();
        assert_eq!(options.out, PathBuf::from("o"));
        assert_eq!(options.version, "1.0");
        assert_eq!(options.cmdline, ["a=1", "b"]);
        assert_eq!(options.source_date_epoch, 42);
        assert!(!options.iso);
    }

    #[test]
    fn refuses_unknown_and_missing_with_names() {
        let err = parse_build(&strings(&["--out", "o", "--frob"]), None).unwrap_err();
        assert!(err.to_string().contains("unknown option '--frob'"), "{err}");
        let err = parse_build(&strings(&["--out", "o", "--version", "1"]), None).unwrap_err();
        assert!(err.to_string().contains("missing --celld"), "{err}");
        let err = parse_build(&strings(&["--out"]), None).unwrap_err();
        assert!(err.to_string().contains("--out needs a value"), "{err}");
        let err = parse_build(&strings(&[]), Some("yesterday")).unwrap_err();
        assert!(err.to_string().contains("SOURCE_DATE_EPOCH"), "{err}");
    }
}

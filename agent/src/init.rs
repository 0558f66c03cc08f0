//! PID-1 duties only: the system mounts, hostname, loopback, and the power paths. Every
//! step logs and carries on: PID 1 exiting panics the kernel.
//!
//! DHCP, the console logger and the panic path belong to the bootable-image work.

use std::path::Path;

use nix::mount::{MsFlags, mount};

/// One entry of the mount table.
struct Mount {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
    /// Options to retry with when the kernel refuses `data` (an older kernel).
    fallback: Option<&'static str>,
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

/// In order: later entries mount inside earlier ones.
const MOUNTS: &[Mount] = &[
    Mount {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
        fallback: None,
    },
    Mount {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
        fallback: None,
    },
    Mount {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: MsFlags::MS_NOSUID,
        data: Some("mode=0755"),
        fallback: None,
    },
    Mount {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: Some("gid=5,mode=0620,ptmxmode=0666"),
        fallback: None,
    },
    Mount {
        source: "shm",
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: Some("mode=1777"),
        fallback: None,
    },
    Mount {
        source: "run",
        target: "/run",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=0755"),
        fallback: None,
    },
    Mount {
        source: "tmp",
        target: "/tmp",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
        fallback: None,
    },
    Mount {
        source: "cgroup2",
        target: "/sys/fs/cgroup",
        fstype: "cgroup2",
        flags: NOSUID_NODEV_NOEXEC,
        // favordynmods: moving a process into a cgroup (every task start) does not wait
        // for an RCU grace period.
        data: Some("nsdelegate,favordynmods"),
        fallback: Some("nsdelegate"),
    },
];

/// Moves PID 1 off the initramfs root. The kernel refuses pivot_root when the current
/// root is the initial rootfs (it has no parent mount), and every task starts with
/// pivot_root; a recursive bind of "/" moved over "/" gives the namespace a root that
/// has a parent, for the cost of two mounts and no copying.
pub fn leave_initramfs_root() -> Result<(), String> {
    let staging = Path::new("/.root");
    let _ = std::fs::create_dir(staging);
    let step = |what: &str, r: nix::Result<()>| r.map_err(|e| format!("{what}: {}", e.desc()));
    step(
        "bind / on /.root",
        mount(
            Some("/"),
            staging,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        ),
    )?;
    step("chdir /.root", nix::unistd::chdir(staging))?;
    step(
        "move /.root to /",
        mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>),
    )?;
    step("chroot", nix::unistd::chroot("."))?;
    step("chdir /", nix::unistd::chdir("/"))
}

/// Mounts the system filesystems; returns one message per failure.
pub fn mount_system() -> Vec<String> {
    let mut errors = Vec::new();
    for m in MOUNTS {
        let target = Path::new(m.target);
        let _ = std::fs::create_dir_all(target);
        let mut result = mount(Some(m.source), target, Some(m.fstype), m.flags, m.data);
        if result == Err(nix::errno::Errno::EINVAL) && m.fallback.is_some() {
            result = mount(Some(m.source), target, Some(m.fstype), m.flags, m.fallback);
        }
        if let Err(e) = result {
            // devtmpfs may be mounted by the kernel already (CONFIG_DEVTMPFS_MOUNT).
            if e != nix::errno::Errno::EBUSY {
                errors.push(format!("mount {} on {}: {}", m.fstype, m.target, e.desc()));
            }
        }
    }
    // Let task cgroups use every controller the kernel has.
    if let Ok(c) = std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers") {
        let enable: Vec<String> = c.split_whitespace().map(|c| format!("+{c}")).collect();
        if let Err(e) = std::fs::write("/sys/fs/cgroup/cgroup.subtree_control", enable.join(" ")) {
            errors.push(format!("enabling cgroup controllers: {e}"));
        }
    }
    errors
}

/// Sets the hostname: the configured one, else `node-<last 3 bytes of the first MAC>`.
pub fn set_hostname(configured: &str, macs: &[String]) -> Result<String, String> {
    let name = if configured.is_empty() {
        let mac = macs
            .first()
            .and_then(|m| m.split_once('='))
            .map(|(_, mac)| mac.replace(':', ""))
            .unwrap_or_default();
        format!("node-{}", &mac[mac.len().saturating_sub(6)..])
    } else {
        configured.to_string()
    };
    nix::unistd::sethostname(&name).map_err(|e| format!("sethostname {name}: {}", e.desc()))?;
    Ok(name)
}

/// Lets ctrl-alt-del reach PID 1 as SIGINT (a graceful reboot) instead of an
/// immediate reset.
pub fn route_ctrl_alt_del() -> Result<(), String> {
    nix::sys::reboot::set_cad_enabled(false).map_err(|e| format!("reboot(CAD_OFF): {}", e.desc()))
}

/// Syncs and reboots or powers off. Only returns on failure.
pub fn power(off: bool) -> String {
    nix::unistd::sync();
    let how = if off {
        nix::sys::reboot::RebootMode::RB_POWER_OFF
    } else {
        nix::sys::reboot::RebootMode::RB_AUTOBOOT
    };
    match nix::sys::reboot::reboot(how) {
        Ok(never) => match never {},
        Err(e) => format!("reboot(2): {}", e.desc()),
    }
}

/// Syncs and boots the kernel staged by kexec_file_load. Falls back to a firmware
/// reboot when the kernel refuses (nothing staged, or no kexec support); only returns
/// when both fail.
pub fn kexec_reboot() -> String {
    nix::unistd::sync();
    let kexec = match nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_KEXEC) {
        Ok(never) => match never {},
        Err(e) => format!("reboot(KEXEC): {}", e.desc()),
    };
    tracing::error!(error = %kexec, "kexec reboot failed: rebooting by firmware instead");
    format!("{kexec}; {}", power(false))
}

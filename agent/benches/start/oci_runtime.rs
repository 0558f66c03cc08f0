//! The OCI side: one bundle per runtime with the same rootfs, namespaces, capabilities,
//! masked paths and seccomp profile as a celld task, and limits only where the runtime can
//! set them on this host. Each runtime command is timed from spawn to exit.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::{CPU_MILLIS, MEMORY_BYTES, PIDS_MAX, Result};

/// The same names as celld's default profile (agent/src/task/seccomp.rs `DENIED`), which
/// holds the 15 calls the comparison asks for and more: EPERM for each, allow the rest.
pub const DENIED_SYSCALLS: &[&str] = &[
    "acct",
    "add_key",
    "adjtimex",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "delete_module",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "init_module",
    "iopl",
    "ioperm",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mount",
    "mount_setattr",
    "move_mount",
    "name_to_handle_at",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "pivot_root",
    "process_vm_readv",
    "process_vm_writev",
    "ptrace",
    "quotactl",
    "reboot",
    "request_key",
    "settimeofday",
    "swapoff",
    "swapon",
    "syslog",
    "umount2",
    "userfaultfd",
    "uselib",
    "vhangup",
];

/// celld's default capability set (the OCI/Docker defaults).
const CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// One OCI runtime with its bundle: the same rootfs, namespaces, capabilities, masked paths
/// and seccomp profile as a celld task; limits only where the runtime can set them here.
#[derive(Clone)]
pub struct OciRuntime {
    name: &'static str,
    bundle: PathBuf,
    cgroup_parent: String,
    stderr: PathBuf,
}

impl OciRuntime {
    pub fn new(
        name: &'static str,
        work: &Path,
        rootfs: &Path,
        tag: u32,
        limits: bool,
    ) -> Result<OciRuntime> {
        let bundle = work.join(format!("bundle-{name}"));
        std::fs::create_dir_all(&bundle).map_err(|e| format!("{}: {e}", bundle.display()))?;
        let cgroup_parent = format!("celld-bench-{tag}-{name}");
        let config = oci_config(rootfs, &cgroup_parent, limits);
        let text = serde_json::to_string_pretty(&config).map_err(|e| e.to_string())?;
        let path = bundle.join("config.json");
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(OciRuntime {
            name,
            stderr: work.join(format!("{name}.stderr")),
            bundle,
            cgroup_parent,
        })
    }

    /// Runs one runtime command to its end; its wall time.
    fn command(&self, args: &[&str]) -> Result<Duration> {
        let stderr = std::fs::File::create(&self.stderr)
            .map_err(|e| format!("{}: {e}", self.stderr.display()))?;
        let t0 = Instant::now();
        let status = Command::new(self.name)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .status()
            .map_err(|e| format!("{} {}: {e}", self.name, args.join(" ")))?;
        let took = t0.elapsed();
        if !status.success() {
            let msg = std::fs::read_to_string(&self.stderr).unwrap_or_default();
            return Err(format!(
                "{} {} failed ({status}): {}",
                self.name,
                args.join(" "),
                msg.trim()
            ));
        }
        Ok(took)
    }

    /// `run`: spawn to exit of the runtime, which waits for the task and deletes it.
    pub fn run(&self, id: &str) -> Result<Duration> {
        let bundle = self.bundle.to_string_lossy();
        self.command(&["run", "--bundle", &bundle, id])
    }

    /// `create` (all setup, the init waits before exec) then `start`; each one's time.
    /// The container is deleted afterwards, untimed.
    pub fn create_start(&self, id: &str) -> Result<(Duration, Duration)> {
        let bundle = self.bundle.to_string_lossy();
        let create = self.command(&["create", "--bundle", &bundle, id]);
        let start = match create {
            Ok(_) => self.command(&["start", id]),
            Err(_) => Ok(Duration::ZERO),
        };
        // Deleted whatever happened above, so no half-made container is left behind.
        let delete = self.command(&["delete", "--force", id]);
        let (create, start) = (create?, start?);
        delete?;
        Ok((create, start))
    }

    /// Removes the parent cgroup of the bench containers in every mounted hierarchy.
    pub fn remove_cgroup_parent(&self) {
        let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") else {
            return;
        };
        let _ = std::fs::remove_dir(Path::new("/sys/fs/cgroup").join(&self.cgroup_parent));
        for e in entries.flatten() {
            let _ = std::fs::remove_dir(e.path().join(&self.cgroup_parent));
        }
    }
}

fn oci_config(rootfs: &Path, cgroup_parent: &str, limits: bool) -> serde_json::Value {
    use serde_json::json;
    let caps: Vec<&str> = CAPABILITIES.to_vec();
    let namespaces: Vec<serde_json::Value> = ["pid", "mount", "ipc", "uts", "network", "cgroup"]
        .iter()
        .map(|t| json!({ "type": t }))
        .collect();
    let mut linux = json!({
        "cgroupsPath": format!("/{cgroup_parent}/ctr"),
        "namespaces": namespaces,
        "maskedPaths": celld::task::spec::DEFAULT_MASKED_PATHS,
        "readonlyPaths": celld::task::spec::DEFAULT_READONLY_PATHS,
        "seccomp": {
            "defaultAction": "SCMP_ACT_ALLOW",
            "architectures": ["SCMP_ARCH_X86_64"],
            "syscalls": [{
                "names": DENIED_SYSCALLS,
                "action": "SCMP_ACT_ERRNO",
                "errnoRet": libc::EPERM,
            }],
        },
    });
    if limits {
        linux["resources"] = json!({
            "devices": [{"allow": false, "access": "rwm"}],
            "memory": {"limit": MEMORY_BYTES},
            "cpu": {"quota": CPU_MILLIS * 100, "period": 100_000},
            "pids": {"limit": PIDS_MAX},
        });
    }
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": ["/bin/true"],
            "env": ["PATH=/bin", "HOSTNAME=bench"],
            "cwd": "/",
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "noNewPrivileges": true,
        },
        "root": {"path": rootfs, "readonly": false},
        "hostname": "bench",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "nodev", "mode=1777"]},
        ],
        "linux": linux,
    })
}

type Job = Box<dyn FnOnce() + Send>;

/// A thread in its own mount namespace with a fresh cgroup2 on /sys/fs/cgroup: crun 1.8
/// refuses the v1 hybrid layout, and processes spawned from this thread see only cgroup2.
/// Setting it up once keeps the unshare and mount out of crun's timings.
pub struct PrivateCgroup2Thread {
    jobs: mpsc::Sender<Job>,
}

impl PrivateCgroup2Thread {
    pub fn start() -> Result<PrivateCgroup2Thread> {
        use nix::mount::{MsFlags, mount};
        let (jobs, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready) = mpsc::channel::<Result<()>>();
        std::thread::spawn(move || {
            let setup = (|| -> Result<()> {
                // The mount namespace (and with it fs attributes) of this thread only.
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
                    .map_err(|e| format!("unshare(CLONE_NEWNS): {e}"))?;
                // The cgroup2 mount below must not propagate back to the host.
                mount(
                    None::<&str>,
                    "/",
                    None::<&str>,
                    MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                    None::<&str>,
                )
                .map_err(|e| format!("making / private: {e}"))?;
                mount(
                    Some("cgroup2"),
                    "/sys/fs/cgroup",
                    Some("cgroup2"),
                    MsFlags::empty(),
                    None::<&str>,
                )
                .map_err(|e| format!("mounting cgroup2 on /sys/fs/cgroup: {e}"))
            })();
            let ok = setup.is_ok();
            let _ = ready_tx.send(setup);
            if ok {
                for job in rx {
                    job();
                }
            }
        });
        ready
            .recv()
            .map_err(|_| "the crun thread died during setup".to_string())??;
        Ok(PrivateCgroup2Thread { jobs })
    }

    pub fn call<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> Result<R> {
        let (tx, rx) = mpsc::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| "the crun thread is gone".to_string())?;
        rx.recv().map_err(|_| "the crun thread is gone".to_string())
    }
}

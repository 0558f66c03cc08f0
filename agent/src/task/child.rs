//! The task setup helper: `celld __task-init`, exec'd by celld right after `clone` into
//! the task's new namespaces (so it is PID 1 of the task's pid namespace).
//!
//! Being a fresh single-threaded process, it may allocate, read files and use every
//! library freely, which the child side of a clone in multi-threaded celld could not. It
//! reads its plan from fd 3 (a little-endian u32 length, then JSON), builds the task's
//! world step by step, waits for the "go" byte that says it is in the task's cgroup, and
//! finally execs the
//! task's program, which keeps its pid. Any failure is written to fd 4 as
//! `error <step> <errno> <detail>` and the helper exits; success is fd 4 closing on exec.

use std::ffi::CString;
use std::fs;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::unistd::{Gid, Uid, chdir, execve, pivot_root, sethostname, setresgid, setresuid};

use super::seccomp::{Instruction, to_program};
use super::spec::Rlimit;
use crate::sys;

pub const PLAN_FD: i32 = 3;
pub const REPORT_FD: i32 = 4;
/// Sent on the plan fd once the helper's pid is in the task's cgroup.
pub const GO: &[u8] = b"g";

/// Everything the helper needs, serialized by celld.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct ChildPlan {
    pub rootfs: PathBuf,
    pub argv: Vec<String>,
    /// `KEY=value`.
    pub env: Vec<String>,
    pub cwd: String,
    pub hostname: String,
    pub isolated_net: bool,
    pub readonly_rootfs: bool,
    pub masked_paths: Vec<String>,
    pub readonly_paths: Vec<String>,
    /// Capability names kept in every set but ambient.
    pub capabilities: Vec<String>,
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    pub rlimits: Vec<Rlimit>,
    pub landlock: bool,
    /// The two compiled filters (see `seccomp::Profile`), or none.
    pub seccomp: Option<(Vec<Instruction>, Vec<Instruction>)>,
}

/// A setup step that failed.
#[derive(Debug)]
pub struct StepError {
    pub step: &'static str,
    pub errno: i32,
    pub detail: String,
}

trait Step<T> {
    fn step(self, step: &'static str, detail: impl std::fmt::Display) -> Result<T, StepError>;
}

impl<T> Step<T> for Result<T, Errno> {
    fn step(self, step: &'static str, detail: impl std::fmt::Display) -> Result<T, StepError> {
        self.map_err(|e| StepError {
            step,
            errno: e as i32,
            detail: format!("{detail}: {}", e.desc()),
        })
    }
}

impl<T> Step<T> for std::io::Result<T> {
    fn step(self, step: &'static str, detail: impl std::fmt::Display) -> Result<T, StepError> {
        self.map_err(|e| StepError {
            step,
            errno: e.raw_os_error().unwrap_or(0),
            detail: format!("{detail}: {e}"),
        })
    }
}

/// Entry point of `celld __task-init`. Never returns.
pub fn run() -> ! {
    // fds 3 and 4 were placed by celld's clone_and_exec.
    let (plan_fd, report_fd) = match (take_fd(PLAN_FD), take_fd(REPORT_FD)) {
        (Some(p), Some(r)) => (p, r),
        _ => {
            eprintln!("celld __task-init is started by celld itself, never by hand");
            std::process::exit(2);
        }
    };
    let mut report = fs::File::from(report_fd);
    let mut plan_file = fs::File::from(plan_fd);
    let result = read_plan(&mut plan_file)
        .and_then(|plan| setup_and_exec(&plan, &mut plan_file, &mut report));
    if let Err(e) = result {
        let detail = e.detail.replace('\n', " ");
        let _ = writeln!(report, "error {} {} {}", e.step, e.errno, detail);
    }
    std::process::exit(127);
}

fn take_fd(fd: i32) -> Option<OwnedFd> {
    sys::take_inherited_fd(fd)
}

fn read_plan(file: &mut fs::File) -> Result<ChildPlan, StepError> {
    let mut len = [0u8; 4];
    file.read_exact(&mut len).step("read-plan", "length")?;
    let len = u32::from_le_bytes(len) as usize;
    if len > 16 << 20 {
        return Err(StepError {
            step: "read-plan",
            errno: libc::EINVAL,
            detail: format!("plan of {len} bytes"),
        });
    }
    let mut buf = vec![0u8; len];
    file.read_exact(&mut buf).step("read-plan", "body")?;
    serde_json::from_slice(&buf).map_err(|e| StepError {
        step: "read-plan",
        errno: libc::EINVAL,
        detail: e.to_string(),
    })
}

/// Blocks until celld says the helper is in the task's cgroup.
fn wait_for_go(file: &mut fs::File) -> Result<(), StepError> {
    let mut b = [0u8; 1];
    file.read_exact(&mut b)
        .step("wait-cgroup", "celld went away")?;
    if b != GO {
        return Err(StepError {
            step: "wait-cgroup",
            errno: libc::EPROTO,
            detail: format!("unexpected byte {}", b[0]),
        });
    }
    Ok(())
}

fn setup_and_exec(
    plan: &ChildPlan,
    plan_file: &mut fs::File,
    report: &mut fs::File,
) -> Result<(), StepError> {
    nix::unistd::setsid().step("setsid", "")?;
    sethostname(&plan.hostname).step("sethostname", &plan.hostname)?;
    if plan.isolated_net {
        sys::loopback_up().step("loopback-up", "lo")?;
    }
    build_root(plan)?;
    enter_root(plan)?;
    wait_for_go(plan_file)?;
    // Now in the task's cgroup: a cgroup namespace made here is rooted there, so the task
    // sees its own cgroup as "/".
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWCGROUP).step("unshare-cgroup", "")?;
    // (while CAP_SYS_ADMIN is still held: the capabilities are cut below.)
    for rl in &plan.rlimits {
        sys::set_rlimit(rl.resource, rl.soft, rl.hard).step("setrlimit", &rl.name)?;
    }
    set_identity_and_caps(plan)?;
    let landlock_abi = if plan.landlock {
        super::landlock::restrict_to(Path::new("/")).map_err(|e| StepError {
            step: "landlock",
            errno: 0,
            detail: e,
        })?
    } else {
        0
    };
    nix::sys::prctl::set_no_new_privs().step("no-new-privs", "")?;
    let cwd = if plan.cwd.is_empty() { "/" } else { &plan.cwd };
    chdir(cwd).step("chdir", cwd)?;
    let (path, argv, envp) = exec_args(plan)?;
    sys::cloexec_from(3).step("close-range", "")?;
    let _ = writeln!(report, "landlock {landlock_abi}");
    if let Some((deny, clone3)) = &plan.seccomp {
        // Last before exec: from here on the task's own rules hold.
        seccompiler::apply_filter(&to_program(clone3)).map_err(seccomp_error)?;
        seccompiler::apply_filter(&to_program(deny)).map_err(seccomp_error)?;
    }
    let e = execve(&path, &argv, &envp).unwrap_err();
    Err(e).step("exec", path.to_string_lossy())
}

fn seccomp_error(e: seccompiler::Error) -> StepError {
    StepError {
        step: "seccomp",
        errno: 0,
        detail: e.to_string(),
    }
}

fn mkdir(p: &Path) -> Result<(), StepError> {
    fs::create_dir_all(p).step("mkdir", p.display())
}

fn mount_at(
    src: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
    step: &'static str,
) -> Result<(), StepError> {
    mount(src, target, fstype, flags, data).step(step, target.display())
}

fn build_root(plan: &ChildPlan) -> Result<(), StepError> {
    let root = &plan.rootfs;
    // Nothing we mount may leak back to the node's mount namespace.
    mount_at(
        None,
        Path::new("/"),
        None,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None,
        "make-private",
    )?;
    // pivot_root needs the new root to be a mount point: bind it onto itself.
    mount(
        Some(root.as_path()),
        root.as_path(),
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .step("bind-rootfs", root.display())?;
    let nosuid_nodev_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let proc_dir = root.join("proc");
    mkdir(&proc_dir)?;
    mount_at(
        Some("proc"),
        &proc_dir,
        Some("proc"),
        nosuid_nodev_noexec,
        None,
        "mount-proc",
    )?;
    build_dev(root)?;
    let sys_dir = root.join("sys");
    mkdir(&sys_dir)?;
    mount_at(
        Some("sysfs"),
        &sys_dir,
        Some("sysfs"),
        nosuid_nodev_noexec | MsFlags::MS_RDONLY,
        None,
        "mount-sys",
    )?;
    let tmp = root.join("tmp");
    mkdir(&tmp)?;
    mount_at(
        Some("tmpfs"),
        &tmp,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
        "mount-tmp",
    )?;
    for p in &plan.masked_paths {
        mask_path(&root.join(p.trim_start_matches('/')), root)?;
    }
    for p in &plan.readonly_paths {
        readonly_path(&root.join(p.trim_start_matches('/')))?;
    }
    Ok(())
}

/// A minimal /dev: a few harmless device nodes bound from the node, its own devpts, shm.
fn build_dev(root: &Path) -> Result<(), StepError> {
    let dev = root.join("dev");
    mkdir(&dev)?;
    mount_at(
        Some("tmpfs"),
        &dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME,
        Some("mode=755,size=65536k"),
        "mount-dev",
    )?;
    for name in ["null", "zero", "full", "random", "urandom", "tty"] {
        let target = dev.join(name);
        fs::File::create(&target).step("mknod-dev", target.display())?;
        let src = Path::new("/dev").join(name);
        mount(
            Some(&src),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .step("bind-dev", target.display())?;
    }
    let pts = dev.join("pts");
    mkdir(&pts)?;
    mount_at(
        Some("devpts"),
        &pts,
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
        "mount-devpts",
    )?;
    let shm = dev.join("shm");
    mkdir(&shm)?;
    mount_at(
        Some("shm"),
        &shm,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=1777,size=65536k"),
        "mount-shm",
    )?;
    for (link, target) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        symlink(target, dev.join(link)).step("symlink-dev", link)?;
    }
    Ok(())
}

fn mask_path(p: &Path, root: &Path) -> Result<(), StepError> {
    let Ok(meta) = fs::symlink_metadata(p) else {
        return Ok(()); // nothing there to hide
    };
    if meta.is_dir() {
        mount_at(
            Some("tmpfs"),
            p,
            Some("tmpfs"),
            MsFlags::MS_RDONLY,
            None,
            "mask-path",
        )
    } else {
        mount(
            Some(&root.join("dev/null")),
            p,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .step("mask-path", p.display())
    }
}

fn readonly_path(p: &Path) -> Result<(), StepError> {
    if fs::symlink_metadata(p).is_err() {
        return Ok(());
    }
    mount(
        Some(p),
        p,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .step("readonly-path", p.display())?;
    let flags = MsFlags::MS_BIND
        | MsFlags::MS_REMOUNT
        | MsFlags::MS_RDONLY
        | MsFlags::MS_NOSUID
        | MsFlags::MS_NODEV
        | MsFlags::MS_NOEXEC;
    mount(None::<&str>, p, None::<&str>, flags, None::<&str>).step("readonly-path", p.display())
}

fn enter_root(plan: &ChildPlan) -> Result<(), StepError> {
    chdir(&plan.rootfs).step("chdir-rootfs", plan.rootfs.display())?;
    // pivot_root(".", ".") stacks the old root on top of the new one; unmounting "."
    // then drops the old root without needing a directory for it inside the rootfs.
    pivot_root(".", ".").step("pivot_root", plan.rootfs.display())?;
    umount2(".", MntFlags::MNT_DETACH).step("umount-old-root", "")?;
    chdir("/").step("chdir", "/")?;
    if plan.readonly_rootfs {
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .step("readonly-rootfs", "/")?;
    }
    Ok(())
}

fn set_identity_and_caps(plan: &ChildPlan) -> Result<(), StepError> {
    use caps::{CapSet, Capability, CapsHashSet};
    let keep: CapsHashSet = plan
        .capabilities
        .iter()
        .filter_map(|c| c.parse::<Capability>().ok())
        .collect();
    let caps_err = |step: &'static str| {
        move |e: caps::errors::CapsError| StepError {
            step,
            errno: libc::EPERM,
            detail: e.to_string(),
        }
    };
    for cap in caps::all() {
        if !keep.contains(&cap) && caps::has_cap(None, CapSet::Bounding, cap).unwrap_or(false) {
            caps::drop(None, CapSet::Bounding, cap).map_err(caps_err("cap-bounding"))?;
        }
    }
    let gids: Vec<Gid> = plan
        .additional_gids
        .iter()
        .map(|g| Gid::from_raw(*g))
        .collect();
    nix::unistd::setgroups(&gids).step("setgroups", format!("{gids:?}"))?;
    let gid = Gid::from_raw(plan.gid);
    setresgid(gid, gid, gid).step("setgid", plan.gid)?;
    if plan.uid != 0 {
        // Keep the permitted set across the uid change; the sets are cut to size below.
        nix::sys::prctl::set_keepcaps(true).step("keepcaps", "")?;
        let uid = Uid::from_raw(plan.uid);
        setresuid(uid, uid, uid).step("setuid", plan.uid)?;
    }
    caps::clear(None, CapSet::Ambient).map_err(caps_err("cap-ambient"))?;
    caps::set(None, CapSet::Effective, &keep).map_err(caps_err("cap-effective"))?;
    caps::set(None, CapSet::Permitted, &keep).map_err(caps_err("cap-permitted"))?;
    caps::set(None, CapSet::Inheritable, &keep).map_err(caps_err("cap-inheritable"))?;
    Ok(())
}

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

type ExecArgs = (CString, Vec<CString>, Vec<CString>);

fn cstring(s: &str) -> Result<CString, StepError> {
    CString::new(s).map_err(|_| StepError {
        step: "exec-args",
        errno: libc::EINVAL,
        detail: format!("{s:?} holds a NUL byte"),
    })
}

/// argv[0] as a path: itself when it holds a '/', else the first match on the task's PATH.
pub fn resolve_program(argv0: &str, env: &[String], root: &Path) -> Option<PathBuf> {
    if argv0.contains('/') {
        return Some(PathBuf::from(argv0));
    }
    let path = env
        .iter()
        .find_map(|kv| kv.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH);
    path.split(':')
        .filter(|d| d.starts_with('/'))
        .find_map(|d| {
            let candidate = Path::new(d).join(argv0);
            let on_node = root.join(candidate.strip_prefix("/").ok()?);
            on_node.exists().then_some(candidate)
        })
}

fn exec_args(plan: &ChildPlan) -> Result<ExecArgs, StepError> {
    let argv0 = plan.argv.first().map(String::as_str).unwrap_or_default();
    let path = resolve_program(argv0, &plan.env, Path::new("/")).ok_or_else(|| StepError {
        step: "exec",
        errno: libc::ENOENT,
        detail: format!("{argv0:?} not found on the task's PATH"),
    })?;
    let path = cstring(&path.to_string_lossy())?;
    let argv = plan
        .argv
        .iter()
        .map(|a| cstring(a))
        .collect::<Result<_, _>>()?;
    let mut env: Vec<CString> = plan
        .env
        .iter()
        .map(|a| cstring(a))
        .collect::<Result<_, _>>()?;
    if !plan.env.iter().any(|kv| kv.starts_with("PATH=")) {
        env.push(cstring(&format!("PATH={DEFAULT_PATH}"))?);
    }
    Ok((path, argv, env))
}

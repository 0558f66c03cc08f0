//! Starting a task, celld's side: cgroup, pipes, `clone` into new namespaces, the setup
//! helper's plan, and its report.
//!
//! Runs on a blocking thread. The clone child only maps descriptors and execs
//! `/proc/self/exe __task-init` (see `sys::clone_and_exec`); all real setup happens in
//! that fresh process (`child.rs`), which reports failure with the step and errno.

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use super::child::{ChildPlan, GO, PLAN_FD, REPORT_FD, resolve_program};
use super::seccomp::Profile;
use super::spec::{Network, SpecError, TaskSpec};
use crate::cgroup::{CgroupRoot, TaskCgroup};
use crate::sys;

/// A task that is running its program.
pub struct Spawned {
    pub pid: u32,
    pub landlock_abi: u32,
    pub cgroup: TaskCgroup,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// Why a task did not start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpawnError {
    pub step: String,
    pub errno: i32,
    pub detail: String,
    /// The helper's pid when it was created (it still has to be reaped).
    pub pid: Option<u32>,
}

impl std::fmt::Display for SpawnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let errno = nix::errno::Errno::from_raw(self.errno);
        if self.errno != 0 {
            write!(f, "{}: {} ({})", self.step, errno, self.detail)
        } else {
            write!(f, "{}: {}", self.step, self.detail)
        }
    }
}

fn fail(step: &str, errno: i32, detail: impl Into<String>) -> SpawnError {
    SpawnError {
        step: step.to_string(),
        errno,
        detail: detail.into(),
        pid: None,
    }
}

/// How long the helper may take to set up before it is killed.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Checks on the node that cannot be done by pure validation: the rootfs is a directory
/// and argv[0] is found inside it.
pub fn preflight(spec: &TaskSpec) -> Result<(), SpecError> {
    if !spec.rootfs.is_dir() {
        return Err(SpecError::new(
            "rootfs",
            format!("{} is not a directory on this node", spec.rootfs.display()),
        ));
    }
    let env = plan_env(spec);
    let argv0 = &spec.argv[0];
    let found = resolve_program(argv0, &env, &spec.rootfs).is_some_and(|p| {
        let inside = spec.rootfs.join(p.strip_prefix("/").unwrap_or(&p));
        inside.symlink_metadata().is_ok()
    });
    if !found {
        return Err(SpecError::new(
            "argv",
            format!(
                "{argv0:?} is not in the rootfs {} (nor on its PATH)",
                spec.rootfs.display()
            ),
        ));
    }
    Ok(())
}

fn plan_env(spec: &TaskSpec) -> Vec<String> {
    let mut env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    if !spec.env.contains_key("HOSTNAME") {
        env.push(format!("HOSTNAME={}", spec.hostname()));
    }
    env
}

pub fn plan_for(spec: &TaskSpec, seccomp: &Profile) -> ChildPlan {
    ChildPlan {
        rootfs: spec.rootfs.clone(),
        argv: spec.argv.clone(),
        env: plan_env(spec),
        cwd: spec.cwd.clone(),
        hostname: spec.hostname().to_string(),
        isolated_net: spec.isolation.network == Network::Isolated,
        readonly_rootfs: spec.isolation.readonly_rootfs,
        masked_paths: spec.isolation.masked_paths.clone(),
        readonly_paths: spec.isolation.readonly_paths.clone(),
        capabilities: spec
            .isolation
            .capabilities
            .iter()
            .map(|c| c.to_string())
            .collect(),
        uid: spec.isolation.uid,
        gid: spec.isolation.gid,
        additional_gids: spec.isolation.additional_gids.clone(),
        rlimits: spec.isolation.rlimits.clone(),
        landlock: spec.isolation.landlock,
        seccomp: spec
            .isolation
            .seccomp
            .then(|| (seccomp.deny.clone(), seccomp.clone3.clone())),
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd), SpawnError> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| fail("pipe", e as i32, "pipe2"))
}

/// Starts `spec`'s program in its own namespaces and cgroup. Blocking.
pub fn spawn_task(
    spec: &TaskSpec,
    cgroups: &CgroupRoot,
    seccomp: &Profile,
) -> Result<Spawned, SpawnError> {
    let cgroup = cgroups
        .create(&spec.id, &spec.resources)
        .map_err(|e| fail("cgroup", 0, e.to_string()))?;
    let plan = serde_json::to_vec(&plan_for(spec, seccomp))
        .map_err(|e| fail("plan", libc::EINVAL, e.to_string()))?;

    let (plan_r, plan_w) = pipe()?;
    let (report_r, report_w) = pipe()?;
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let devnull = nix::fcntl::open(
        "/dev/null",
        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| fail("open", e as i32, "/dev/null"))?;
    // SAFETY-free wrapper: take ownership so it is closed on every path.
    let devnull = sys::owned(devnull);

    let exe = c"/proc/self/exe";
    let arg0 = CString::new("celld").unwrap_or_default();
    let arg1 = CString::new("__task-init").unwrap_or_default();
    let argv = [arg0.as_ptr(), arg1.as_ptr(), std::ptr::null()];
    let envp = [std::ptr::null()];
    let mut flags =
        libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC;
    if spec.isolation.network == Network::Isolated {
        flags |= libc::CLONE_NEWNET;
    }
    let fd_map = [
        (devnull.as_raw_fd(), 0),
        (out_w.as_raw_fd(), 1),
        (err_w.as_raw_fd(), 2),
        (plan_r.as_raw_fd(), PLAN_FD),
        (report_w.as_raw_fd(), REPORT_FD),
    ];
    let exec = sys::ExecArgs {
        path: exe,
        argv: &argv,
        envp: &envp,
    };
    let pid = sys::clone_and_exec(flags, &exec, &fd_map, REPORT_FD)
        .map_err(|e| fail("clone", e as i32, "new namespaces"))?;
    let pid_u = pid.as_raw() as u32;
    drop((plan_r, report_w, out_w, err_w, devnull));

    let with_pid = |mut e: SpawnError| {
        e.pid = Some(pid_u);
        e
    };
    let kill_helper = || {
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    };
    // The plan goes first so the helper builds the task's root while its pid is moved
    // into the cgroup (on cgroup v1 that write alone can take milliseconds); the "go"
    // byte after it releases the helper to join the cgroup namespace and exec.
    let mut plan_w = std::fs::File::from(plan_w);
    let mut message = (plan.len() as u32).to_le_bytes().to_vec();
    message.extend_from_slice(&plan);
    if let Err(e) = plan_w.write_all(&message) {
        kill_helper();
        return Err(with_pid(fail(
            "send-plan",
            e.raw_os_error().unwrap_or(0),
            e.to_string(),
        )));
    }
    if let Err(e) = cgroup.add_pid(pid_u) {
        kill_helper();
        return Err(with_pid(fail("cgroup", 0, e.to_string())));
    }
    if let Err(e) = plan_w.write_all(GO) {
        kill_helper();
        return Err(with_pid(fail(
            "send-go",
            e.raw_os_error().unwrap_or(0),
            e.to_string(),
        )));
    }
    drop(plan_w);

    let report = match read_report(report_r, SETUP_TIMEOUT) {
        Ok(r) => r,
        Err(e) => {
            kill_helper();
            return Err(with_pid(e));
        }
    };
    let mut landlock_abi = 0;
    for line in report.lines() {
        if let Some(v) = line.strip_prefix("landlock ") {
            landlock_abi = v.trim().parse().unwrap_or(0);
        } else if let Some(rest) = line.strip_prefix("error ") {
            let mut parts = rest.splitn(3, ' ');
            let step = parts.next().unwrap_or("setup").to_string();
            let errno = parts.next().and_then(|e| e.parse().ok()).unwrap_or(0);
            let detail = parts.next().unwrap_or("").to_string();
            return Err(with_pid(SpawnError {
                step,
                errno,
                detail,
                pid: None,
            }));
        } else if let Some(errno) = sys::parse_execfail(line) {
            return Err(with_pid(fail("exec-helper", errno, "/proc/self/exe")));
        }
    }
    Ok(Spawned {
        pid: pid_u,
        landlock_abi,
        cgroup,
        stdout: out_r,
        stderr: err_r,
    })
}

/// Reads the helper's report until EOF (its exec closed the pipe) or the deadline.
fn read_report(fd: OwnedFd, timeout: Duration) -> Result<String, SpawnError> {
    let deadline = Instant::now() + timeout;
    let mut file = std::fs::File::from(fd);
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(fail(
                "setup-timeout",
                libc::ETIMEDOUT,
                format!("no report after {} s", timeout.as_secs()),
            ));
        }
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(
            std::os::fd::AsFd::as_fd(&file),
            PollFlags::POLLIN,
        )];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(fail("poll-report", e as i32, "")),
        }
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(fail("read-report", e.raw_os_error().unwrap_or(0), "")),
        }
        if out.len() > 64 * 1024 {
            break;
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

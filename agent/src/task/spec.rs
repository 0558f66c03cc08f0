//! The task specification as the agent understands it, and its validation.
//!
//! Pure: no I/O. Checks that need the node's filesystem (the rootfs exists, argv[0] is in
//! it) live in `preflight`.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A field of a request that is not acceptable, and what is allowed instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct SpecError {
    pub field: String,
    pub problem: String,
}

impl SpecError {
    pub fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            problem: problem.into(),
        }
    }
}

pub const MAX_NAME_LEN: usize = 63;
pub const MIN_MEMORY_BYTES: u64 = 1 << 20;
pub const DEFAULT_PIDS_MAX: u64 = 1024;
pub const DEFAULT_KILL_GRACE: Duration = Duration::from_secs(10);
pub const MAX_KILL_GRACE: Duration = Duration::from_secs(3600);
pub const MAX_PRIORITY: i32 = 1000;
const MAX_ARGS: usize = 4096;
const MAX_ENV: usize = 4096;
const MAX_STRING: usize = 64 * 1024;

/// Network of a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Network {
    /// Own network namespace with only loopback, up.
    Isolated,
    /// The node's network namespace.
    Host,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartMode {
    Never,
    OnFailure,
    Always,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestartPolicy {
    pub mode: RestartMode,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// 0: unlimited.
    pub max_restarts: u32,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            mode: RestartMode::Never,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            max_restarts: 0,
        }
    }
}

impl RestartPolicy {
    /// Delay before restart number `restarts + 1`: doubled each time, capped.
    pub fn backoff(&self, restarts: u32) -> Duration {
        let factor = 1u32.checked_shl(restarts.min(20)).unwrap_or(u32::MAX);
        self.initial_backoff
            .saturating_mul(factor)
            .min(self.max_backoff)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Resources {
    pub memory_bytes: u64,
    pub cpu_millis: u64,
    pub pids_max: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rlimit {
    /// libc RLIMIT_* number.
    pub resource: i64,
    pub name: String,
    pub soft: u64,
    pub hard: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Isolation {
    pub network: Network,
    pub seccomp: bool,
    pub landlock: bool,
    pub readonly_rootfs: bool,
    pub capabilities: HashSet<caps::Capability>,
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    pub hostname: String,
    pub rlimits: Vec<Rlimit>,
    pub masked_paths: Vec<String>,
    pub readonly_paths: Vec<String>,
}

impl Default for Isolation {
    fn default() -> Self {
        Self {
            network: Network::Isolated,
            seccomp: true,
            landlock: true,
            readonly_rootfs: false,
            capabilities: default_capabilities(),
            uid: 0,
            gid: 0,
            additional_gids: Vec::new(),
            hostname: String::new(),
            rlimits: Vec::new(),
            masked_paths: DEFAULT_MASKED_PATHS.iter().map(|s| s.to_string()).collect(),
            readonly_paths: DEFAULT_READONLY_PATHS
                .iter()
                .map(|s| s.to_string())
                .collect(),
        }
    }
}

/// Paths hidden from every task (the OCI runtime defaults).
pub const DEFAULT_MASKED_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// Paths every task sees read-only.
pub const DEFAULT_READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// The OCI/Docker default capability set.
pub fn default_capabilities() -> HashSet<caps::Capability> {
    use caps::Capability::*;
    [
        CAP_CHOWN,
        CAP_DAC_OVERRIDE,
        CAP_FSETID,
        CAP_FOWNER,
        CAP_MKNOD,
        CAP_NET_RAW,
        CAP_SETGID,
        CAP_SETUID,
        CAP_SETFCAP,
        CAP_SETPCAP,
        CAP_NET_BIND_SERVICE,
        CAP_SYS_CHROOT,
        CAP_KILL,
        CAP_AUDIT_WRITE,
    ]
    .into_iter()
    .collect()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskSpec {
    pub id: String,
    pub job: String,
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub cwd: String,
    pub rootfs: PathBuf,
    pub resources: Resources,
    pub priority: i32,
    pub restart: RestartPolicy,
    pub isolation: Isolation,
    pub kill_grace: Duration,
}

/// What the node can give, for the resource checks.
#[derive(Debug, Clone, Copy)]
pub struct NodeLimits {
    pub memory_bytes: u64,
    pub cpu_millis: u64,
    pub pids_max: u64,
}

/// Checks a task id or job name: it becomes a cgroup and a log file name.
pub fn check_name(field: &str, value: &str) -> Result<(), SpecError> {
    let ok = !value.is_empty()
        && value.len() <= MAX_NAME_LEN
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !value.starts_with('-')
        && !value.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(SpecError::new(
            field,
            format!(
                "{value:?} is not a valid name: use [a-z0-9-], 1 to {MAX_NAME_LEN} characters, \
                 not starting or ending with '-'"
            ),
        ))
    }
}

fn check_string(field: &str, value: &str) -> Result<(), SpecError> {
    if value.contains('\0') {
        return Err(SpecError::new(field, "must not contain a NUL byte"));
    }
    if value.len() > MAX_STRING {
        return Err(SpecError::new(
            field,
            format!(
                "is {} bytes long; at most {MAX_STRING} allowed",
                value.len()
            ),
        ));
    }
    Ok(())
}

/// A path inside the task: absolute, no `..`, no NUL.
pub fn check_task_path(field: &str, value: &str) -> Result<(), SpecError> {
    check_string(field, value)?;
    if !value.starts_with('/') || Path::new(value).components().any(|c| c.as_os_str() == "..") {
        return Err(SpecError::new(
            field,
            format!("{value:?} must be an absolute path without '..'"),
        ));
    }
    Ok(())
}

impl TaskSpec {
    /// Validates every field; the first problem found is returned with the field's name.
    pub fn validate(&self, node: &NodeLimits) -> Result<(), SpecError> {
        check_name("id", &self.id)?;
        if !self.job.is_empty() {
            check_name("job", &self.job)?;
        }
        if self.argv.is_empty() || self.argv[0].is_empty() {
            return Err(SpecError::new("argv", "must name a program in argv[0]"));
        }
        if self.argv.len() > MAX_ARGS {
            return Err(SpecError::new(
                "argv",
                format!("at most {MAX_ARGS} arguments"),
            ));
        }
        for (i, a) in self.argv.iter().enumerate() {
            check_string(&format!("argv[{i}]"), a)?;
        }
        if self.env.len() > MAX_ENV {
            return Err(SpecError::new(
                "env",
                format!("at most {MAX_ENV} variables"),
            ));
        }
        for (k, v) in &self.env {
            let ok = !k.is_empty()
                && !k.contains('=')
                && k.bytes().all(|b| b.is_ascii_graphic() || b == b' ');
            if !ok {
                return Err(SpecError::new(
                    "env",
                    format!("variable name {k:?} must be printable ASCII without '='"),
                ));
            }
            check_string(&format!("env[{k}]"), v)?;
        }
        if !self.cwd.is_empty() {
            check_task_path("cwd", &self.cwd)?;
        }
        let rootfs = self.rootfs.to_string_lossy();
        if rootfs.is_empty() {
            return Err(SpecError::new(
                "rootfs",
                "is required: an absolute directory",
            ));
        }
        check_string("rootfs", &rootfs)?;
        if !self.rootfs.is_absolute() || self.rootfs.components().any(|c| c.as_os_str() == "..") {
            return Err(SpecError::new(
                "rootfs",
                format!("{rootfs:?} must be an absolute path without '..'"),
            ));
        }
        if self.rootfs == Path::new("/") {
            return Err(SpecError::new(
                "rootfs",
                "the node's own root cannot be a task's rootfs",
            ));
        }
        self.validate_resources(node)?;
        if !(0..=MAX_PRIORITY).contains(&self.priority) {
            return Err(SpecError::new(
                "priority",
                format!("{} is outside 0..={MAX_PRIORITY}", self.priority),
            ));
        }
        let r = &self.restart;
        if r.initial_backoff.is_zero() || r.initial_backoff > r.max_backoff {
            return Err(SpecError::new(
                "restart_policy",
                "initial_backoff_ms must be at least 1 and at most max_backoff_ms",
            ));
        }
        if self.kill_grace > MAX_KILL_GRACE {
            return Err(SpecError::new(
                "kill_grace_ms",
                format!("at most {} ms", MAX_KILL_GRACE.as_millis()),
            ));
        }
        self.validate_isolation()
    }

    fn validate_resources(&self, node: &NodeLimits) -> Result<(), SpecError> {
        let r = &self.resources;
        if r.memory_bytes < MIN_MEMORY_BYTES {
            return Err(SpecError::new(
                "resources.memory_bytes",
                format!(
                    "{} is too small: at least {MIN_MEMORY_BYTES} (1 MiB)",
                    r.memory_bytes
                ),
            ));
        }
        if r.memory_bytes > node.memory_bytes {
            return Err(SpecError::new(
                "resources.memory_bytes",
                format!(
                    "{} is more than this node can ever give ({} allocatable)",
                    r.memory_bytes, node.memory_bytes
                ),
            ));
        }
        if r.cpu_millis == 0 || r.cpu_millis > node.cpu_millis {
            return Err(SpecError::new(
                "resources.cpu_millis",
                format!(
                    "{} is outside 1..={} (thousandths of a CPU this node has)",
                    r.cpu_millis, node.cpu_millis
                ),
            ));
        }
        if r.pids_max == 0 || r.pids_max > node.pids_max {
            return Err(SpecError::new(
                "resources.pids_max",
                format!("{} is outside 1..={}", r.pids_max, node.pids_max),
            ));
        }
        Ok(())
    }

    fn validate_isolation(&self) -> Result<(), SpecError> {
        let iso = &self.isolation;
        if !iso.hostname.is_empty() {
            let ok = iso.hostname.len() <= 64
                && iso
                    .hostname
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
            if !ok {
                return Err(SpecError::new(
                    "isolation.hostname",
                    format!(
                        "{:?} is not a hostname: [A-Za-z0-9.-], at most 64",
                        iso.hostname
                    ),
                ));
            }
        }
        if iso.additional_gids.len() > 64 {
            return Err(SpecError::new(
                "isolation.additional_gids",
                "at most 64 groups",
            ));
        }
        for (i, rl) in iso.rlimits.iter().enumerate() {
            if rl.soft > rl.hard {
                return Err(SpecError::new(
                    format!("isolation.rlimits[{i}]"),
                    format!("{}: soft {} is above hard {}", rl.name, rl.soft, rl.hard),
                ));
            }
        }
        for (i, p) in iso.masked_paths.iter().enumerate() {
            check_task_path(&format!("masked_paths[{i}]"), p)?;
        }
        for (i, p) in iso.readonly_paths.iter().enumerate() {
            check_task_path(&format!("readonly_paths[{i}]"), p)?;
        }
        Ok(())
    }

    /// The hostname the task sees.
    pub fn hostname(&self) -> &str {
        if self.isolation.hostname.is_empty() {
            &self.id
        } else {
            &self.isolation.hostname
        }
    }
}

/// Parses a capability name, with or without the CAP_ prefix, any case.
pub fn parse_capability(field: &str, name: &str) -> Result<caps::Capability, SpecError> {
    let upper = name.to_ascii_uppercase();
    let full = if upper.starts_with("CAP_") {
        upper
    } else {
        format!("CAP_{upper}")
    };
    full.parse::<caps::Capability>().map_err(|_| {
        SpecError::new(
            field,
            format!("{name:?} is not a Linux capability (e.g. CAP_NET_ADMIN)"),
        )
    })
}

const RLIMITS: &[(&str, i64)] = &[
    ("CPU", libc::RLIMIT_CPU as i64),
    ("FSIZE", libc::RLIMIT_FSIZE as i64),
    ("DATA", libc::RLIMIT_DATA as i64),
    ("STACK", libc::RLIMIT_STACK as i64),
    ("CORE", libc::RLIMIT_CORE as i64),
    ("RSS", libc::RLIMIT_RSS as i64),
    ("NPROC", libc::RLIMIT_NPROC as i64),
    ("NOFILE", libc::RLIMIT_NOFILE as i64),
    ("MEMLOCK", libc::RLIMIT_MEMLOCK as i64),
    ("AS", libc::RLIMIT_AS as i64),
    ("LOCKS", libc::RLIMIT_LOCKS as i64),
    ("SIGPENDING", libc::RLIMIT_SIGPENDING as i64),
    ("MSGQUEUE", libc::RLIMIT_MSGQUEUE as i64),
    ("NICE", libc::RLIMIT_NICE as i64),
    ("RTPRIO", libc::RLIMIT_RTPRIO as i64),
    ("RTTIME", libc::RLIMIT_RTTIME as i64),
];

/// Parses an rlimit name (`RLIMIT_NOFILE` or `nofile`).
pub fn parse_rlimit(field: &str, name: &str, soft: u64, hard: u64) -> Result<Rlimit, SpecError> {
    let upper = name.to_ascii_uppercase();
    let short = upper.strip_prefix("RLIMIT_").unwrap_or(&upper);
    RLIMITS
        .iter()
        .find(|(n, _)| *n == short)
        .map(|(n, r)| Rlimit {
            resource: *r,
            name: format!("RLIMIT_{n}"),
            soft,
            hard,
        })
        .ok_or_else(|| {
            SpecError::new(
                field,
                format!("{name:?} is not an rlimit (e.g. RLIMIT_NOFILE)"),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn node() -> NodeLimits {
        NodeLimits {
            memory_bytes: 8 << 30,
            cpu_millis: 4000,
            pids_max: 100_000,
        }
    }

    pub(crate) fn spec() -> TaskSpec {
        TaskSpec {
            id: "web-1".into(),
            job: "web".into(),
            argv: vec!["/bin/true".into()],
            env: BTreeMap::new(),
            cwd: String::new(),
            rootfs: "/srv/rootfs".into(),
            resources: Resources {
                memory_bytes: 64 << 20,
                cpu_millis: 500,
                pids_max: 100,
            },
            priority: 100,
            restart: RestartPolicy::default(),
            isolation: Isolation::default(),
            kill_grace: DEFAULT_KILL_GRACE,
        }
    }

    fn field_of(s: TaskSpec) -> String {
        s.validate(&node()).unwrap_err().field
    }

    #[test]
    fn a_plain_spec_is_valid() {
        spec().validate(&node()).unwrap();
    }

    #[test]
    fn names_that_would_escape_a_path_are_refused() {
        for bad in [
            "",
            "a/../b",
            "..",
            "A",
            "a_b",
            "-a",
            "a-",
            &"x".repeat(64),
            "a b",
        ] {
            let mut s = spec();
            s.id = bad.to_string();
            assert_eq!(field_of(s), "id", "{bad:?}");
        }
        let mut s = spec();
        s.job = "../etc".into();
        assert_eq!(field_of(s), "job");
    }

    #[test]
    fn absurd_resources_name_their_field() {
        let mut s = spec();
        s.resources.memory_bytes = 0;
        assert_eq!(field_of(s), "resources.memory_bytes");
        let mut s = spec();
        s.resources.memory_bytes = 9 << 30;
        assert_eq!(field_of(s), "resources.memory_bytes");
        let mut s = spec();
        s.resources.cpu_millis = 0;
        assert_eq!(field_of(s), "resources.cpu_millis");
        let mut s = spec();
        s.resources.cpu_millis = 4001;
        assert_eq!(field_of(s), "resources.cpu_millis");
        let mut s = spec();
        s.resources.pids_max = 0;
        assert_eq!(field_of(s), "resources.pids_max");
    }

    #[test]
    fn paths_must_be_absolute_and_plain() {
        let mut s = spec();
        s.rootfs = "relative".into();
        assert_eq!(field_of(s), "rootfs");
        let mut s = spec();
        s.rootfs = "/srv/../etc".into();
        assert_eq!(field_of(s), "rootfs");
        let mut s = spec();
        s.rootfs = "/".into();
        assert_eq!(field_of(s), "rootfs");
        let mut s = spec();
        s.cwd = "tmp".into();
        assert_eq!(field_of(s), "cwd");
        let mut s = spec();
        s.argv = vec![];
        assert_eq!(field_of(s), "argv");
        let mut s = spec();
        s.argv = vec!["/bin/sh".into(), "a\0b".into()];
        assert_eq!(field_of(s), "argv[1]");
        let mut s = spec();
        s.env.insert("A=B".into(), "x".into());
        assert_eq!(field_of(s), "env");
    }

    #[test]
    fn priority_and_backoff_are_bounded() {
        let mut s = spec();
        s.priority = -1;
        assert_eq!(field_of(s), "priority");
        let mut s = spec();
        s.restart.initial_backoff = Duration::ZERO;
        assert_eq!(field_of(s), "restart_policy");
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let r = RestartPolicy {
            mode: RestartMode::Always,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(1000),
            max_restarts: 0,
        };
        assert_eq!(r.backoff(0), Duration::from_millis(100));
        assert_eq!(r.backoff(1), Duration::from_millis(200));
        assert_eq!(r.backoff(3), Duration::from_millis(800));
        assert_eq!(r.backoff(4), Duration::from_millis(1000));
        assert_eq!(r.backoff(u32::MAX), Duration::from_millis(1000));
    }

    #[test]
    fn capabilities_and_rlimits_parse_by_name() {
        assert_eq!(
            parse_capability("c", "net_admin").unwrap(),
            caps::Capability::CAP_NET_ADMIN
        );
        assert_eq!(
            parse_capability("c", "CAP_KILL").unwrap(),
            caps::Capability::CAP_KILL
        );
        assert_eq!(parse_capability("c", "CAP_FLY").unwrap_err().field, "c");
        assert_eq!(
            parse_rlimit("r", "nofile", 1, 2).unwrap().resource,
            libc::RLIMIT_NOFILE as i64
        );
        assert!(parse_rlimit("r", "RLIMIT_BOGUS", 1, 2).is_err());
    }
}

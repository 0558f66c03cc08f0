//! proto <-> domain, in one place. Conversion checks shapes (enums, required messages,
//! unsupported fields); `TaskSpec::validate` checks values.

use std::time::Duration;

use celld_proto::v1 as pb;

use crate::reimage::ReimageOrder;
use crate::task::logs::{LogLine, Stream};
use crate::task::spec::{
    self, DEFAULT_KILL_GRACE, DEFAULT_PIDS_MAX, Network, Resources, RestartMode, RestartPolicy,
    SpecError, TaskSpec, parse_capability, parse_rlimit,
};
use crate::task::state::{Reason, TaskState, Transition};
use crate::task::{TaskView, oci};

fn restart_from(p: Option<pb::RestartPolicy>) -> Result<RestartPolicy, SpecError> {
    let mut r = RestartPolicy::default();
    let Some(p) = p else { return Ok(r) };
    r.mode = match pb::restart_policy::Mode::try_from(p.mode) {
        Ok(pb::restart_policy::Mode::Unspecified | pb::restart_policy::Mode::Never) => {
            RestartMode::Never
        }
        Ok(pb::restart_policy::Mode::OnFailure) => RestartMode::OnFailure,
        Ok(pb::restart_policy::Mode::Always) => RestartMode::Always,
        Err(_) => {
            return Err(SpecError::new(
                "restart_policy.mode",
                format!("{} is not NEVER, ON_FAILURE or ALWAYS", p.mode),
            ));
        }
    };
    if p.initial_backoff_ms != 0 {
        r.initial_backoff = Duration::from_millis(p.initial_backoff_ms.into());
    }
    if p.max_backoff_ms != 0 {
        r.max_backoff = Duration::from_millis(p.max_backoff_ms.into());
    }
    r.max_restarts = p.max_restarts;
    Ok(r)
}

/// A `RunTask` spec into the agent's form. Values are checked later by `validate`.
pub fn task_spec_from_proto(p: pb::TaskSpec) -> Result<TaskSpec, SpecError> {
    if let Some(h) = &p.health_check
        && *h != pb::HealthCheck::default()
    {
        return Err(SpecError::new(
            "health_check",
            "health checks are not supported by this celld yet; leave it unset",
        ));
    }
    let base = TaskSpec {
        id: p.id,
        job: p.job,
        argv: Vec::new(),
        env: Default::default(),
        cwd: String::new(),
        rootfs: Default::default(),
        resources: Resources::default(),
        priority: p.priority,
        restart: restart_from(p.restart_policy)?,
        isolation: Default::default(),
        kill_grace: if p.kill_grace_ms == 0 {
            DEFAULT_KILL_GRACE
        } else {
            Duration::from_millis(p.kill_grace_ms.into())
        },
    };
    if !p.oci_config_json.is_empty() {
        let clash = [
            ("argv", !p.argv.is_empty()),
            ("env", !p.env.is_empty()),
            ("cwd", !p.cwd.is_empty()),
            ("rootfs", !p.rootfs.is_empty()),
            ("resources", p.resources.is_some()),
            ("isolation", p.isolation.is_some()),
        ];
        if let Some((name, _)) = clash.iter().find(|(_, set)| *set) {
            return Err(SpecError::new(
                *name,
                "must be empty when oci_config_json is given (the config carries it)",
            ));
        }
        return oci::task_from_oci(&p.oci_config_json, base);
    }
    let mut t = base;
    t.argv = p.argv;
    t.env = p.env.into_iter().collect();
    t.cwd = p.cwd;
    t.rootfs = p.rootfs.into();
    let r = p
        .resources
        .ok_or_else(|| SpecError::new("resources", "is required: memory_bytes and cpu_millis"))?;
    t.resources = Resources {
        memory_bytes: r.memory_bytes,
        cpu_millis: r.cpu_millis,
        pids_max: if r.pids_max == 0 {
            DEFAULT_PIDS_MAX
        } else {
            r.pids_max
        },
    };
    if let Some(iso) = p.isolation {
        isolation_from(iso, &mut t.isolation)?;
    }
    Ok(t)
}

/// A `Reimage` request into the order the reimager checks (`reimage::check_order`).
pub fn reimage_order_from_proto(r: pb::ReimageRequest) -> ReimageOrder {
    ReimageOrder {
        version: r.version,
        kernel_url: r.kernel_url,
        initramfs_url: r.initramfs_url,
        cmdline: r.cmdline,
        manifest: r.manifest,
        manifest_signature: r.manifest_signature,
    }
}

fn isolation_from(p: pb::Isolation, iso: &mut spec::Isolation) -> Result<(), SpecError> {
    iso.network = match pb::isolation::Network::try_from(p.network) {
        Ok(pb::isolation::Network::Unspecified | pb::isolation::Network::Isolated) => {
            Network::Isolated
        }
        Ok(pb::isolation::Network::Host) => Network::Host,
        Err(_) => {
            return Err(SpecError::new(
                "isolation.network",
                format!("{} is not ISOLATED or HOST", p.network),
            ));
        }
    };
    if p.userns_host_id != 0 {
        return Err(SpecError::new(
            "isolation.userns_host_id",
            "user namespaces are not supported by this celld yet; leave it 0",
        ));
    }
    iso.seccomp = !p.disable_seccomp;
    iso.landlock = !p.disable_landlock;
    iso.readonly_rootfs = p.readonly_rootfs;
    for (i, c) in p.add_capabilities.iter().enumerate() {
        iso.capabilities.insert(parse_capability(
            &format!("isolation.add_capabilities[{i}]"),
            c,
        )?);
    }
    for (i, c) in p.drop_capabilities.iter().enumerate() {
        iso.capabilities.remove(&parse_capability(
            &format!("isolation.drop_capabilities[{i}]"),
            c,
        )?);
    }
    iso.uid = p.uid.unwrap_or(0);
    iso.gid = p.gid.unwrap_or(0);
    iso.additional_gids = p.additional_gids;
    iso.hostname = p.hostname;
    iso.rlimits = p
        .rlimits
        .iter()
        .enumerate()
        .map(|(i, r)| parse_rlimit(&format!("isolation.rlimits[{i}]"), &r.name, r.soft, r.hard))
        .collect::<Result<_, _>>()?;
    Ok(())
}

pub fn state_to_proto(s: TaskState) -> pb::TaskState {
    match s {
        TaskState::Pending => pb::TaskState::Pending,
        TaskState::Starting => pb::TaskState::Starting,
        TaskState::Running => pb::TaskState::Running,
        TaskState::Dead => pb::TaskState::Dead,
        TaskState::Evicted => pb::TaskState::Evicted,
    }
}

pub fn reason_to_proto(r: Reason) -> pb::TaskReason {
    match r {
        Reason::None => pb::TaskReason::Unspecified,
        Reason::Exited => pb::TaskReason::Exited,
        Reason::Killed => pb::TaskReason::Killed,
        Reason::OomKilled => pb::TaskReason::OomKilled,
        Reason::FailedToStart => pb::TaskReason::FailedToStart,
        Reason::NodeDrain => pb::TaskReason::NodeDrain,
        Reason::Preempted => pb::TaskReason::Preempted,
        Reason::MemoryPressure => pb::TaskReason::MemoryPressure,
        Reason::NodeShutdown => pb::TaskReason::NodeShutdown,
    }
}

fn transition_to_proto(t: &Transition) -> pb::Transition {
    pb::Transition {
        state: state_to_proto(t.state) as i32,
        reason: reason_to_proto(t.reason) as i32,
        at_unix_ms: t.at_unix_ms,
        message: t.message.clone(),
    }
}

pub fn resources_to_proto(r: &Resources) -> pb::Resources {
    pb::Resources {
        memory_bytes: r.memory_bytes,
        cpu_millis: r.cpu_millis,
        pids_max: r.pids_max,
    }
}

pub fn task_to_proto(v: &TaskView) -> pb::TaskStatus {
    pb::TaskStatus {
        id: v.id.clone(),
        job: v.job.clone(),
        state: state_to_proto(v.state) as i32,
        reason: reason_to_proto(v.reason) as i32,
        exit_code: v.exit_code,
        signal: v.signal,
        message: v.message.clone(),
        pid: v.pid,
        restarts: v.restarts,
        priority: v.priority,
        transitions: v.transitions.iter().map(transition_to_proto).collect(),
        usage: Some(pb::TaskUsage {
            memory_bytes: v.usage.memory_bytes,
            memory_peak_bytes: v.usage.memory_peak_bytes,
            cpu_usec: v.usage.cpu_usec,
            oom_kills: v.usage.oom_kills,
            pids: v.usage.pids,
        }),
        resources: Some(resources_to_proto(&v.resources)),
        landlock_abi: v.landlock_abi,
        healthy: v.state == TaskState::Running,
    }
}

pub fn log_to_proto(l: &LogLine) -> pb::LogLine {
    pb::LogLine {
        seq: l.seq,
        stream: match l.stream {
            Stream::Stdout => pb::log_line::Stream::Stdout,
            Stream::Stderr => pb::log_line::Stream::Stderr,
        } as i32,
        at_unix_ms: l.at_unix_ms,
        line: l.line.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal() -> pb::TaskSpec {
        pb::TaskSpec {
            id: "t".into(),
            argv: vec!["/bin/true".into()],
            rootfs: "/srv/r".into(),
            resources: Some(pb::Resources {
                memory_bytes: 1 << 24,
                cpu_millis: 100,
                pids_max: 0,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_fill_what_the_caller_left_out() {
        let t = task_spec_from_proto(minimal()).unwrap();
        assert_eq!(t.resources.pids_max, DEFAULT_PIDS_MAX);
        assert_eq!(t.kill_grace, DEFAULT_KILL_GRACE);
        assert!(t.isolation.seccomp && t.isolation.landlock);
        assert_eq!(t.isolation.network, Network::Isolated);
    }

    #[test]
    fn fields_celld_cannot_honour_are_errors() {
        let mut p = minimal();
        p.health_check = Some(pb::HealthCheck {
            exec: vec!["true".into()],
            ..Default::default()
        });
        assert_eq!(task_spec_from_proto(p).unwrap_err().field, "health_check");
        let mut p = minimal();
        p.isolation = Some(pb::Isolation {
            userns_host_id: 100000,
            ..Default::default()
        });
        assert_eq!(
            task_spec_from_proto(p).unwrap_err().field,
            "isolation.userns_host_id"
        );
        let mut p = minimal();
        p.isolation = Some(pb::Isolation {
            network: 9,
            ..Default::default()
        });
        assert_eq!(
            task_spec_from_proto(p).unwrap_err().field,
            "isolation.network"
        );
        let mut p = minimal();
        p.resources = None;
        assert_eq!(task_spec_from_proto(p).unwrap_err().field, "resources");
        let mut p = minimal();
        p.oci_config_json = "{}".into();
        assert_eq!(task_spec_from_proto(p).unwrap_err().field, "argv");
    }
}

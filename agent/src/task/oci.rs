//! A task from a standard OCI runtime-spec `config.json`.
//!
//! Parsed with oci-spec. Fields celld maps are listed in `KNOWN`; any other field is
//! refused by its JSON path, so a config never half-applies.

use std::collections::BTreeMap;
use std::path::PathBuf;

use oci_spec::runtime::{LinuxNamespaceType, Spec};
use serde_json::Value;

use super::spec::{
    DEFAULT_PIDS_MAX, Network, Resources, SpecError, TaskSpec, parse_capability, parse_rlimit,
};

/// Every JSON path celld understands; `*` is any array element, `{}` any map key.
const KNOWN: &[&str] = &[
    "ociVersion",
    "hostname",
    "annotations",
    "annotations.{}",
    "process",
    "process.terminal",
    "process.args",
    "process.args.*",
    "process.env",
    "process.env.*",
    "process.cwd",
    "process.noNewPrivileges",
    "process.user",
    "process.user.uid",
    "process.user.gid",
    "process.user.additionalGids",
    "process.user.additionalGids.*",
    "process.capabilities",
    "process.capabilities.bounding",
    "process.capabilities.bounding.*",
    "process.capabilities.effective",
    "process.capabilities.effective.*",
    "process.capabilities.permitted",
    "process.capabilities.permitted.*",
    "process.capabilities.inheritable",
    "process.capabilities.inheritable.*",
    "process.capabilities.ambient",
    "process.capabilities.ambient.*",
    "process.rlimits",
    "process.rlimits.*",
    "process.rlimits.*.type",
    "process.rlimits.*.soft",
    "process.rlimits.*.hard",
    "root",
    "root.path",
    "root.readonly",
    "mounts",
    "mounts.*",
    "mounts.*.destination",
    "mounts.*.type",
    "mounts.*.source",
    "mounts.*.options",
    "mounts.*.options.*",
    "linux",
    "linux.namespaces",
    "linux.namespaces.*",
    "linux.namespaces.*.type",
    "linux.resources",
    "linux.resources.memory",
    "linux.resources.memory.limit",
    "linux.resources.cpu",
    "linux.resources.cpu.quota",
    "linux.resources.cpu.period",
    "linux.resources.cpu.shares",
    "linux.resources.pids",
    "linux.resources.pids.limit",
    "linux.resources.devices",
    "linux.resources.devices.*",
    "linux.resources.devices.*.allow",
    "linux.resources.devices.*.access",
    "linux.maskedPaths",
    "linux.maskedPaths.*",
    "linux.readonlyPaths",
    "linux.readonlyPaths.*",
];

/// Mounts celld always provides itself; a config may list them, and nothing else.
const PROVIDED_MOUNTS: &[&str] = &[
    "/proc",
    "/dev",
    "/dev/pts",
    "/dev/shm",
    "/dev/mqueue",
    "/sys",
    "/sys/fs/cgroup",
    "/tmp",
];

fn field(path: &str) -> String {
    format!("oci_config_json.{path}")
}

fn check_known(v: &Value, path: &str) -> Result<(), SpecError> {
    let known = |p: &str| KNOWN.contains(&p);
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                let named = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                let keyed = format!("{path}.{{}}");
                let p = if known(&named) {
                    named
                } else if known(&keyed) {
                    keyed
                } else {
                    return Err(SpecError::new(
                        field(&named),
                        "is not supported by celld (remove it, or use the TaskSpec fields)",
                    ));
                };
                check_known(child, &p)?;
            }
            Ok(())
        }
        Value::Array(items) => {
            let p = format!("{path}.*");
            items.iter().try_for_each(|i| check_known(i, &p))
        }
        _ => Ok(()),
    }
}

/// What the caller sets beside the config (id, job, priority, restart, grace).
pub fn task_from_oci(json: &str, base: TaskSpec) -> Result<TaskSpec, SpecError> {
    let value: Value = serde_json::from_str(json)
        .map_err(|e| SpecError::new("oci_config_json", format!("not valid JSON: {e}")))?;
    check_known(&value, "")?;
    let oci: Spec = serde_json::from_value(value)
        .map_err(|e| SpecError::new("oci_config_json", format!("not an OCI runtime spec: {e}")))?;
    let mut spec = base;

    let process = oci
        .process()
        .as_ref()
        .ok_or_else(|| SpecError::new(field("process"), "is required"))?;
    if process.terminal().unwrap_or(false) {
        return Err(SpecError::new(
            field("process.terminal"),
            "must be false: tasks have no terminal, their output goes to TaskLogs",
        ));
    }
    if process.no_new_privileges() == Some(false) {
        return Err(SpecError::new(
            field("process.noNewPrivileges"),
            "must be true: celld always sets no_new_privs",
        ));
    }
    spec.argv = process.args().clone().unwrap_or_default();
    spec.env = BTreeMap::new();
    for kv in process.env().clone().unwrap_or_default() {
        let (k, v) = kv.split_once('=').ok_or_else(|| {
            SpecError::new(field("process.env"), format!("{kv:?} is not KEY=value"))
        })?;
        spec.env.insert(k.to_string(), v.to_string());
    }
    spec.cwd = process.cwd().to_string_lossy().into_owned();
    let user = process.user();
    spec.isolation.uid = user.uid();
    spec.isolation.gid = user.gid();
    spec.isolation.additional_gids = user.additional_gids().clone().unwrap_or_default();
    if let Some(caps) = process.capabilities() {
        if caps.ambient().as_ref().is_some_and(|a| !a.is_empty()) {
            return Err(SpecError::new(
                field("process.capabilities.ambient"),
                "must be empty: celld gives no ambient capabilities",
            ));
        }
        if let Some(bounding) = caps.bounding() {
            spec.isolation.capabilities = bounding
                .iter()
                .map(|c| parse_capability("oci_config_json.process.capabilities", &c.to_string()))
                .collect::<Result<_, _>>()?;
        }
    }
    spec.isolation.rlimits = process
        .rlimits()
        .clone()
        .unwrap_or_default()
        .iter()
        .map(|r| {
            let name = serde_json::to_value(r.typ())
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            parse_rlimit("oci_config_json.process.rlimits", &name, r.soft(), r.hard())
        })
        .collect::<Result<_, _>>()?;

    let root = oci
        .root()
        .as_ref()
        .ok_or_else(|| SpecError::new(field("root.path"), "is required"))?;
    if !root.path().is_absolute() {
        return Err(SpecError::new(
            field("root.path"),
            "must be an absolute directory on the node (celld has no bundle directory)",
        ));
    }
    spec.rootfs = PathBuf::from(root.path());
    spec.isolation.readonly_rootfs = root.readonly().unwrap_or(false);
    if let Some(h) = oci.hostname() {
        spec.isolation.hostname = h.clone();
    }
    for (i, m) in oci.mounts().clone().unwrap_or_default().iter().enumerate() {
        let dest = m.destination().to_string_lossy();
        if !PROVIDED_MOUNTS.contains(&dest.as_ref()) {
            return Err(SpecError::new(
                field(&format!("mounts[{i}]")),
                format!("{dest}: celld provides only {}", PROVIDED_MOUNTS.join(", ")),
            ));
        }
    }
    map_linux(&oci, &mut spec)?;
    Ok(spec)
}

fn map_linux(oci: &Spec, spec: &mut TaskSpec) -> Result<(), SpecError> {
    let linux = oci
        .linux()
        .as_ref()
        .ok_or_else(|| SpecError::new(field("linux"), "is required (resources and namespaces)"))?;
    spec.isolation.network = Network::Host;
    for ns in linux.namespaces().clone().unwrap_or_default() {
        if ns.path().is_some() {
            return Err(SpecError::new(
                field("linux.namespaces"),
                "joining an existing namespace by path is not supported",
            ));
        }
        match ns.typ() {
            LinuxNamespaceType::Network => spec.isolation.network = Network::Isolated,
            LinuxNamespaceType::User => {
                return Err(SpecError::new(
                    field("linux.namespaces"),
                    "user namespaces are not supported yet",
                ));
            }
            // mount, pid, uts, ipc and cgroup namespaces are always made.
            _ => {}
        }
    }
    let res = linux
        .resources()
        .as_ref()
        .ok_or_else(|| SpecError::new(field("linux.resources"), "is required"))?;
    let memory = res
        .memory()
        .as_ref()
        .and_then(|m| m.limit())
        .ok_or_else(|| SpecError::new(field("linux.resources.memory.limit"), "is required"))?;
    let cpu = res.cpu().as_ref();
    let quota = cpu.and_then(|c| c.quota());
    let period = cpu.and_then(|c| c.period()).unwrap_or(100_000);
    let cpu_millis = match quota {
        Some(q) if q > 0 && period > 0 => (q as u64).saturating_mul(1000) / period,
        Some(q) => {
            return Err(SpecError::new(
                field("linux.resources.cpu.quota"),
                format!("{q} must be positive (celld always limits CPU)"),
            ));
        }
        None => {
            return Err(SpecError::new(
                field("linux.resources.cpu.quota"),
                "is required (with period; quota/period is the CPU count)",
            ));
        }
    };
    let pids = res.pids().as_ref().map(|p| p.limit());
    spec.resources = Resources {
        memory_bytes: u64::try_from(memory).map_err(|_| {
            SpecError::new(
                field("linux.resources.memory.limit"),
                format!("{memory} must be positive"),
            )
        })?,
        cpu_millis,
        pids_max: match pids {
            None => DEFAULT_PIDS_MAX,
            Some(p) => u64::try_from(p).map_err(|_| {
                SpecError::new(
                    field("linux.resources.pids.limit"),
                    format!("{p} must be positive"),
                )
            })?,
        },
    };
    for (i, d) in res.devices().clone().unwrap_or_default().iter().enumerate() {
        if d.allow() {
            return Err(SpecError::new(
                field(&format!("linux.resources.devices[{i}]")),
                "device access beyond celld's minimal /dev is not supported",
            ));
        }
    }
    if let Some(m) = linux.masked_paths() {
        spec.isolation.masked_paths = m.clone();
    }
    if let Some(r) = linux.readonly_paths() {
        spec.isolation.readonly_paths = r.clone();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn base() -> TaskSpec {
        TaskSpec {
            id: "oci-1".into(),
            job: String::new(),
            argv: vec![],
            env: BTreeMap::new(),
            cwd: String::new(),
            rootfs: PathBuf::new(),
            resources: Resources::default(),
            priority: 0,
            restart: Default::default(),
            isolation: Default::default(),
            kill_grace: super::super::spec::DEFAULT_KILL_GRACE,
        }
    }

    /// The shape `runc spec` writes, made absolute and given limits.
    pub(crate) const CONFIG: &str = r#"{
      "ociVersion": "1.0.2",
      "process": {
        "terminal": false,
        "user": {"uid": 0, "gid": 0},
        "args": ["sh", "-c", "echo hi"],
        "env": ["PATH=/bin:/usr/bin", "TERM=xterm"],
        "cwd": "/",
        "capabilities": {
          "bounding": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
          "effective": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
          "permitted": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
        },
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
        "noNewPrivileges": true
      },
      "root": {"path": "/srv/rootfs", "readonly": true},
      "hostname": "box",
      "mounts": [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid"]}
      ],
      "linux": {
        "resources": {
          "devices": [{"allow": false, "access": "rwm"}],
          "memory": {"limit": 67108864},
          "cpu": {"quota": 50000, "period": 100000},
          "pids": {"limit": 64}
        },
        "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"},
                       {"type": "uts"}, {"type": "mount"}, {"type": "cgroup"}],
        "maskedPaths": ["/proc/kcore"],
        "readonlyPaths": ["/proc/sys"]
      }
    }"#;

    #[test]
    fn a_runc_style_config_maps_to_a_task() {
        let t = task_from_oci(CONFIG, base()).unwrap();
        assert_eq!(t.argv, ["sh", "-c", "echo hi"]);
        assert_eq!(t.env["PATH"], "/bin:/usr/bin");
        assert_eq!(t.rootfs, PathBuf::from("/srv/rootfs"));
        assert!(t.isolation.readonly_rootfs);
        assert_eq!(t.resources.memory_bytes, 64 << 20);
        assert_eq!(t.resources.cpu_millis, 500);
        assert_eq!(t.resources.pids_max, 64);
        assert_eq!(t.isolation.network, Network::Isolated);
        assert_eq!(t.isolation.capabilities.len(), 3);
        assert_eq!(t.isolation.rlimits[0].resource, libc::RLIMIT_NOFILE as i64);
        assert_eq!(t.isolation.hostname, "box");
    }

    #[test]
    fn unknown_fields_are_refused_by_path() {
        let with = |from: &str, to: &str| {
            task_from_oci(&CONFIG.replace(from, to), base())
                .unwrap_err()
                .field
        };
        assert_eq!(
            with(
                "\"hostname\": \"box\"",
                "\"hostname\": \"box\", \"hooks\": {}"
            ),
            "oci_config_json.hooks"
        );
        assert_eq!(
            with("\"maskedPaths\"", "\"seccomp\": {}, \"maskedPaths\""),
            "oci_config_json.linux.seccomp"
        );
        assert_eq!(
            with(
                "\"cwd\": \"/\"",
                "\"cwd\": \"/\", \"apparmorProfile\": \"x\""
            ),
            "oci_config_json.process.apparmorProfile"
        );
        assert_eq!(
            with("{\"type\": \"pid\"}", "{\"type\": \"user\"}"),
            "oci_config_json.linux.namespaces"
        );
        assert_eq!(
            with("\"destination\": \"/proc\"", "\"destination\": \"/data\""),
            "oci_config_json.mounts[0]"
        );
        assert_eq!(
            with("\"/srv/rootfs\"", "\"rootfs\""),
            "oci_config_json.root.path"
        );
        assert_eq!(
            with("\"terminal\": false", "\"terminal\": true"),
            "oci_config_json.process.terminal"
        );
    }

    #[test]
    fn garbage_is_a_clear_error() {
        assert_eq!(
            task_from_oci("{", base()).unwrap_err().field,
            "oci_config_json"
        );
        assert_eq!(
            task_from_oci("{\"process\": 3}", base()).unwrap_err().field,
            "oci_config_json"
        );
    }
}

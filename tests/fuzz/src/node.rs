//! `celld.v1.Node` requests through the checks celld's handlers (`celld::api`) run before
//! they act.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

use celld::reimage::check_order;
use celld::task::spec::{NodeLimits, check_name};
use celld_proto::v1 as pb;
use ed25519_dalek::{SigningKey, VerifyingKey};

use crate::{Outcome, decode, split_kind};

/// The request messages of the service, in the order of `node.proto`; an input's first
/// byte (modulo the count) picks one.
pub const KINDS: [&str; 13] = [
    "GetStatus",
    "RunTask",
    "KillTask",
    "ListTasks",
    "WatchTasks",
    "TaskLogs",
    "Cordon",
    "Uncordon",
    "Drain",
    "ApplySysctls",
    "Reimage",
    "Reboot",
    "Poweroff",
];

/// What the fuzzed node can give a task.
const LIMITS: NodeLimits = NodeLimits {
    memory_bytes: 8 << 30,
    cpu_millis: 4000,
    pids_max: 4096,
};

/// A sysctl root that does not exist: keys that pass the checks fail to open (celld never
/// creates a sysctl file), so nothing is written anywhere.
const SYSCTL_ROOT: &str = "/nonexistent/celld-fuzz/proc/sys";

/// Largest artifact a fuzzed node downloads (the default of `reimage_max_bytes`).
const REIMAGE_MAX_BYTES: u64 = 1 << 30;

/// The master key of the fuzzed node; the seeds sign their manifests with it.
pub const MASTER_SEED: [u8; 32] = [7; 32];

pub fn master_key() -> &'static VerifyingKey {
    static KEY: OnceLock<VerifyingKey> = OnceLock::new();
    KEY.get_or_init(|| SigningKey::from_bytes(&MASTER_SEED).verifying_key())
}

fn refused(e: impl ToString) -> String {
    e.to_string()
}

/// One Node request: `data[0]` picks the message, the rest is its encoding.
pub fn node_requests(data: &[u8]) -> Outcome {
    let Some((kind, body)) = split_kind(data, KINDS.len()) else {
        return Ok(());
    };
    match KINDS[kind] {
        "GetStatus" => decode::<pb::GetStatusRequest>(body).map(drop),
        "RunTask" => run_task(decode(body)?),
        "KillTask" => check_name("id", &decode::<pb::KillTaskRequest>(body)?.id).map_err(refused),
        "ListTasks" => {
            let job = decode::<pb::ListTasksRequest>(body)?.job;
            if job.is_empty() {
                return Ok(());
            }
            check_name("job", &job).map_err(refused)
        }
        "WatchTasks" => decode::<pb::WatchTasksRequest>(body).map(drop),
        "TaskLogs" => check_name("id", &decode::<pb::TaskLogsRequest>(body)?.id).map_err(refused),
        "Cordon" => decode::<pb::CordonRequest>(body).map(drop),
        "Uncordon" => decode::<pb::UncordonRequest>(body).map(drop),
        "Drain" => decode::<pb::DrainRequest>(body).map(drop),
        "ApplySysctls" => apply_sysctls(decode(body)?),
        "Reimage" => reimage(decode(body)?),
        "Reboot" => decode::<pb::RebootRequest>(body).map(drop),
        "Poweroff" => decode::<pb::PoweroffRequest>(body).map(drop),
        other => unreachable!("no Node request {other}"),
    }
}

/// RunTask: the proto conversion (which parses `oci_config_json`) and `TaskSpec::validate`;
/// only the preflight that looks at the node's filesystem is left out.
fn run_task(r: pb::RunTaskRequest) -> Outcome {
    let spec = r.spec.ok_or("spec: is required")?;
    let spec = celld::api::convert::task_spec_from_proto(spec).map_err(refused)?;
    spec.validate(&LIMITS).map_err(refused)
}

/// ApplySysctls: each key and value checked and "applied" under a root that does not
/// exist; accepted when every one was refused only for being absent.
fn apply_sysctls(r: pb::ApplySysctlsRequest) -> Outcome {
    let wanted: BTreeMap<String, String> = r.sysctls.into_iter().collect();
    let results = celld::kernel::sysctl::apply_sysctls(Path::new(SYSCTL_ROOT), &wanted);
    assert_eq!(results.len(), wanted.len(), "a sysctl went unreported");
    match results
        .iter()
        .find(|r| !r.error.starts_with("no such sysctl"))
    {
        Some(r) => Err(r.error.clone()),
        None => Ok(()),
    }
}

/// Reimage: every check made before a download (manifest, signature, URLs, cmdline).
fn reimage(r: pb::ReimageRequest) -> Outcome {
    let order = celld::api::convert::reimage_order_from_proto(r);
    check_order(master_key(), &order, REIMAGE_MAX_BYTES)
        .map(drop)
        .map_err(refused)
}

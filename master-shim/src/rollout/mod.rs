//! Rolling a new image over the fleet: nodes in batches of `max_unavailable`, each
//! cordoned, drained within its jobs' budgets, told to `Reimage` (kexec, or a reboot into
//! PXE, which then serves the new version), waited for until it registers again with the
//! new version and a new boot id and is Ready, and uncordoned. A node that refuses or
//! does not come back in time stops the rollout and is sent back to the version it ran.
//! The rollout lives in the store, so a restarted master resumes it.

use std::sync::Arc;

use celld_proto::v1 as pb;
use tonic::Status;

use crate::admin::internal;
use crate::control::unix_ms;
use crate::poll::Liveness;
use crate::server::MasterState;

mod engine;
pub mod plan;

pub use engine::tick;
pub use plan::{Phase, Rollout, RolloutNode, RolloutState};

const DEFAULT_TIMEOUT_MS: u64 = 10 * 60 * 1000;

pub fn to_pb(r: &Rollout) -> pb::RolloutStatus {
    pb::RolloutStatus {
        id: r.id,
        to_version: r.to_version.clone(),
        state: r.state.as_str().into(),
        message: r.message.clone(),
        max_unavailable: r.max_unavailable,
        nodes: r
            .nodes
            .iter()
            .map(|n| pb::RolloutNode {
                node: n.node.clone(),
                from_version: n.from_version.clone(),
                phase: n.phase.as_str().into(),
                message: n.message.clone(),
            })
            .collect(),
    }
}

/// The node ids `selector` picks out of `nodes` (id, labels).
pub fn select(
    selector: &str,
    nodes: &[(String, std::collections::BTreeMap<String, String>)],
) -> Result<Vec<String>, String> {
    let selector = selector.trim();
    if selector.is_empty() || selector == "all" {
        return Ok(nodes.iter().map(|(id, _)| id.clone()).collect());
    }
    let terms: Vec<&str> = selector.split(',').map(str::trim).collect();
    if terms.iter().all(|t| t.contains('=')) {
        let mut wanted = Vec::new();
        for t in terms {
            let (k, v) = t.split_once('=').unwrap_or((t, ""));
            if k.is_empty() {
                return Err(format!("selector term {t:?}: key=value"));
            }
            wanted.push((k, v));
        }
        return Ok(nodes
            .iter()
            .filter(|(_, labels)| {
                wanted
                    .iter()
                    .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(id, _)| id.clone())
            .collect());
    }
    if terms.iter().any(|t| t.contains('=')) {
        return Err("selector: either key=value terms or node ids, not both".into());
    }
    for t in &terms {
        if !nodes.iter().any(|(id, _)| id == t) {
            return Err(format!("selector: node {t:?} is not in the cell"));
        }
    }
    Ok(terms.into_iter().map(str::to_string).collect())
}

/// Checks a rollout request and stores the rollout; the engine takes it from there.
pub fn start(state: &Arc<MasterState>, r: pb::StartRolloutRequest) -> Result<Rollout, Status> {
    if r.max_unavailable == 0 {
        return Err(Status::invalid_argument(
            "max_unavailable: at least 1 (nodes out of service at once)",
        ));
    }
    state.images.get(&r.to_version).map_err(|_| {
        Status::not_found(format!(
            "image {:?} is not stored (cellmaster image list; cellmaster image add DIR)",
            r.to_version
        ))
    })?;
    if state.advertise.is_none() {
        return Err(Status::failed_precondition(
            "this master serves no images over HTTP: start it with --http ADDR (and --advertise \
             HOST when ADDR is 0.0.0.0)",
        ));
    }
    let last = state.store.last_rollout().map_err(internal)?;
    if let Some(l) = &last
        && l.state.is_active()
    {
        return Err(Status::failed_precondition(format!(
            "rollout {} to {} is {}: resume it, or abort it first",
            l.id,
            l.to_version,
            l.state.as_str()
        )));
    }
    let (candidates, facts) = {
        let registry = state.registry();
        let fleet = state.fleet.lock().unwrap_or_else(|p| p.into_inner());
        let candidates: Vec<(String, std::collections::BTreeMap<String, String>)> = registry
            .records
            .iter()
            .map(|(id, rec)| (id.clone(), rec.labels.clone()))
            .collect();
        let facts: std::collections::BTreeMap<String, (bool, String, String)> = registry
            .records
            .iter()
            .map(|(id, rec)| {
                let ready = fleet.get(id).is_some_and(|h| h.liveness == Liveness::Ready);
                (
                    id.clone(),
                    (ready, rec.boot_id.clone(), rec.image_version.clone()),
                )
            })
            .collect();
        (candidates, facts)
    };
    let selected = select(&r.selector, &candidates).map_err(Status::invalid_argument)?;
    if selected.is_empty() {
        return Err(Status::invalid_argument(format!(
            "selector {:?} matches no node",
            r.selector
        )));
    }
    let now = unix_ms();
    let mut nodes = Vec::new();
    for id in selected {
        let (ready, boot_id, version) = facts.get(&id).cloned().unwrap_or_default();
        let (phase, message) = if version == r.to_version {
            (Phase::Done, format!("already on {version}"))
        } else if !ready {
            return Err(Status::failed_precondition(format!(
                "node {id} is not ready: a rollout starts over ready nodes only"
            )));
        } else {
            (Phase::Queued, String::new())
        };
        nodes.push(RolloutNode {
            node: id,
            from_version: version,
            from_boot_id: boot_id,
            phase,
            since_ms: now,
            message,
            evicted: Vec::new(),
            stopping: Vec::new(),
        });
    }
    let or_default = |ms: u32| {
        if ms == 0 {
            DEFAULT_TIMEOUT_MS
        } else {
            u64::from(ms)
        }
    };
    let mut rollout = Rollout {
        id: last.map_or(1, |l| l.id + 1),
        to_version: r.to_version,
        selector: r.selector,
        max_unavailable: r.max_unavailable,
        drain_timeout_ms: or_default(r.drain_timeout_ms),
        ready_timeout_ms: or_default(r.ready_timeout_ms),
        state: RolloutState::Running,
        message: "started".into(),
        nodes,
        created_ms: now,
    };
    if rollout.finished() {
        rollout.state = RolloutState::Done;
        rollout.message = format!("every selected node is on {} already", rollout.to_version);
    }
    state.store.put_rollout(&rollout).map_err(internal)?;
    tracing::info!(id = rollout.id, to = %rollout.to_version, nodes = rollout.nodes.len(), "rollout started");
    Ok(rollout)
}

/// Pause, resume or abort the current rollout.
pub fn control(
    state: &MasterState,
    action: pb::control_rollout_request::Action,
) -> Result<Rollout, Status> {
    use pb::control_rollout_request::Action;
    let _write = state
        .rollout_write
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let mut r = state
        .store
        .last_rollout()
        .map_err(internal)?
        .ok_or_else(|| Status::not_found("there is no rollout"))?;
    let next = match (action, r.state) {
        (Action::Pause, RolloutState::Running) => RolloutState::Paused,
        (Action::Resume, RolloutState::Paused) => RolloutState::Running,
        (Action::Abort, s) if s.is_active() => RolloutState::Aborted,
        (Action::Unspecified, _) => {
            return Err(Status::invalid_argument("action: pause, resume or abort"));
        }
        (a, s) => {
            return Err(Status::failed_precondition(format!(
                "rollout {} is {}: cannot {}",
                r.id,
                s.as_str(),
                a.as_str_name().to_ascii_lowercase()
            )));
        }
    };
    r.state = next;
    r.message = match next {
        RolloutState::Paused => "paused: nodes under way finish, no new ones start".into(),
        RolloutState::Aborted => "aborted: no new nodes start; those under way are left".into(),
        _ => "resumed".into(),
    };
    state.store.put_rollout(&r).map_err(internal)?;
    Ok(r)
}

//! What the master does when it hears from nodes: a registration (a new boot loses what
//! the old one ran), a liveness change (Down loses the node's tasks, which are placed
//! again), and a full status (reconciled against the store, see [`crate::reconcile`]).

use std::net::IpAddr;
use std::sync::Arc;

use celld_proto::v1 as pb;

use crate::jobfile::Resources;
use crate::poll::Change;
use crate::reconcile::{Action, reconcile};
use crate::registry::{RegisterError, Registered};
use crate::server::MasterState;
use crate::store::{NodeRow, NodeState, StoreError, TaskState};

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A node's resources from the master's.
pub fn pb_resources(r: Resources) -> pb::Resources {
    pb::Resources {
        memory_bytes: r.memory_bytes,
        cpu_millis: r.cpu_millis,
        pids_max: r.pids_max,
    }
}

/// The master's resources from a node's (absent: zero).
pub fn resources(r: Option<pb::Resources>) -> Resources {
    let r = r.unwrap_or_default();
    Resources {
        memory_bytes: r.memory_bytes,
        cpu_millis: r.cpu_millis,
        pids_max: r.pids_max,
    }
}

/// A MAC as `aa:bb:cc:dd:ee:ff` from colons or hyphens in any case, with or without the
/// `iface=` celld puts before it; None if it is not one.
pub fn normal_mac(mac: &str) -> Option<String> {
    let mac = mac.rsplit('=').next().unwrap_or(mac);
    let parts: Vec<&str> = mac.split([':', '-']).collect();
    let ok = parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()));
    ok.then(|| parts.join(":").to_ascii_lowercase())
}

#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    #[error(transparent)]
    Refused(#[from] RegisterError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A node's registration: checked, recorded in the registry and the store (cordon and
/// liveness kept for a known node). A new boot id loses the tasks of the old boot.
pub async fn register(
    state: &Arc<MasterState>,
    req: &pb::RegisterRequest,
    peer: IpAddr,
) -> Result<Registered, RegistrationError> {
    let _control = state.control.lock().await;
    let reg = state.registry().register(&state.fleet, req, peer)?;
    let identity = req.identity.clone().unwrap_or_default();
    let update = |n: &mut NodeRow| {
        n.machine_id = identity.machine_id.clone();
        n.address = reg.address.clone();
        n.labels = req.labels.clone().into_iter().collect();
        n.boot_id = req.boot_id.clone();
        n.image_version = req.image_version.clone();
        n.allocatable = resources(req.allocatable);
        n.macs = identity.macs.iter().filter_map(|m| normal_mac(m)).collect();
    };
    match state.store.update_node(&reg.id, &mut |n| update(n)) {
        Ok(_) => {}
        Err(StoreError::NotFound { .. }) => {
            let mut row = NodeRow {
                id: reg.id.clone(),
                ..Default::default()
            };
            update(&mut row);
            state.store.put_node(&row)?;
        }
        Err(e) => return Err(e.into()),
    }
    if reg.rebooted_from.is_some() {
        // Connections to the old boot are dead, whatever the client still believes.
        state.calls.forget(&reg.address);
    }
    if let Some(old) = &reg.rebooted_from {
        let reason = format!("{} rebooted (boot {old} ended)", reg.id);
        for t in state.store.tasks_on_node(&reg.id)? {
            if t.state.is_on_node() {
                state
                    .store
                    .set_task_state(&t.id, TaskState::Lost, &reason)?;
                tracing::warn!(task = %t.id, node = %reg.id, "task lost: node rebooted");
            }
        }
    }
    Ok(reg)
}

/// Applies one change the poller reported about node `id`.
pub async fn on_change(
    state: &Arc<MasterState>,
    id: &str,
    change: Change,
) -> Result<(), StoreError> {
    match change {
        Change::Ready => {
            let now = unix_ms();
            ignore_missing(state.store.update_node(id, &mut |n| {
                n.state = NodeState::Ready;
                n.last_seen_ms = now;
            }))
        }
        Change::Unknown => Ok(()),
        Change::Down => {
            let _control = state.control.lock().await;
            let reason = format!("node {id} down: {} polls missed", state.policy.down_after);
            match state.store.mark_node_down(id, &reason) {
                Ok((_, lost)) => {
                    for t in lost {
                        tracing::warn!(task = %t.id, node = %id, "task lost: node down");
                    }
                    Ok(())
                }
                Err(StoreError::NotFound { .. }) => Ok(()),
                Err(e) => Err(e),
            }
        }
        Change::Status(status) => reconcile_node(state, id, &status).await,
    }
}

fn ignore_missing<T>(r: Result<T, StoreError>) -> Result<(), StoreError> {
    match r {
        Ok(_) | Err(StoreError::NotFound { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

async fn reconcile_node(
    state: &Arc<MasterState>,
    id: &str,
    status: &pb::NodeStatus,
) -> Result<(), StoreError> {
    let _control = state.control.lock().await;
    let moved = {
        let mut registry = state.registry();
        let before = registry
            .records
            .get(id)
            .map(|r| (r.boot_id.clone(), r.image_version.clone(), r.allocatable));
        registry.apply(id, status);
        before
            != Some((
                status.boot_id.clone(),
                status.image_version.clone(),
                status.allocatable,
            ))
    };
    if moved {
        ignore_missing(state.store.update_node(id, &mut |n| {
            n.boot_id = status.boot_id.clone();
            n.image_version = status.image_version.clone();
            n.allocatable = resources(status.allocatable);
        }))?;
    }
    let expected = state.store.tasks_on_node(id)?;
    let actions = reconcile(id, &expected, &status.tasks, &state.recent_placements());
    for action in actions {
        match action {
            Action::SetState {
                task_id,
                state: to,
                reason,
            } => {
                tracing::info!(task = %task_id, node = %id, state = to.as_str(), %reason, "task state from node");
                ignore_missing(state.store.set_task_state(&task_id, to, &reason))?;
            }
            Action::Kill { node_task_id, why } => {
                tracing::warn!(task = %node_task_id, node = %id, %why, "killing a task the master does not expect");
                state.kill_on_node(id, &node_task_id, 0).await;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::normal_mac;

    #[test]
    fn macs_in_every_spelling_become_one() {
        for m in [
            "52:54:00:77:00:01",
            "52-54-00-77-00-01",
            "eth0=52:54:00:77:00:01",
            "52:54:00:77:00:01".to_uppercase().as_str(),
        ] {
            assert_eq!(normal_mac(m).as_deref(), Some("52:54:00:77:00:01"), "{m}");
        }
        for bad in ["", "52:54:00:77:00", "zz:54:00:77:00:01", "525400770001"] {
            assert_eq!(normal_mac(bad), None, "{bad}");
        }
    }
}

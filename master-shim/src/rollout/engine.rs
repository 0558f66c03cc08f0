//! Carrying a rollout out, one tick at a time (every poll interval): advance the nodes
//! under way, start queued ones within `max_unavailable`, and write the rollout back.
//! Each phase can be repeated safely, so a tick cut short by a crash is simply done again.

use std::sync::Arc;

use celld_proto::v1 as pb;

use super::plan::{NodeNow, Phase, Rollout, RolloutState};
use crate::control::unix_ms;
use crate::drain::{DrainMemory, drain_step};
use crate::nodes::CallError;
use crate::poll::Liveness;
use crate::server::MasterState;
use crate::store::StoreError;

/// How long a node may take to answer Reimage (it downloads and checks the image first).
const REIMAGE_CALL: std::time::Duration = std::time::Duration::from_secs(180);
/// How long the token a reimaged node joins again with lasts (a firmware reboot and PXE
/// included; the rollout gives up on the node sooner by its ready timeout).
const REJOIN_TTL: std::time::Duration = std::time::Duration::from_secs(3600);

fn node_now(state: &MasterState, node: &str) -> NodeNow {
    let ready = state
        .fleet
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(node)
        .is_some_and(|h| h.liveness == Liveness::Ready);
    let registry = state.registry();
    let rec = registry.records.get(node);
    NodeNow {
        ready,
        boot_id: rec.map(|r| r.boot_id.clone()).unwrap_or_default(),
        image_version: rec.map(|r| r.image_version.clone()).unwrap_or_default(),
    }
}

async fn set_boot_version(
    state: &MasterState,
    node: &str,
    version: &str,
) -> Result<(), StoreError> {
    match state
        .store
        .update_node(node, &mut |n| n.boot_version = version.to_string())
    {
        Ok(_) | Err(StoreError::NotFound { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

async fn uncordon(state: &Arc<MasterState>, node: &str) {
    if let Err(e) = crate::admin::set_cordon(state, node, false).await {
        tracing::warn!(%node, error = %e.message(), "rollout: uncordon failed");
    }
}

/// Asks `node` to reimage to `version`; Err is the node's (or the master's) reason.
async fn send_reimage(state: &MasterState, node: &str, version: &str) -> Result<String, CallError> {
    let image = state
        .images
        .get(version)
        .map_err(|e| CallError::Refused(e.to_string()))?;
    let advertise = state
        .advertise
        .as_ref()
        .ok_or_else(|| CallError::Refused("this master serves no images over HTTP".into()))?;
    let key = state.images.public_key_hex();
    // The new boot makes a new key, so it joins again: with a token for this node only,
    // good for one use while the rollout waits for it.
    let (fingerprint, join) = match &state.trust {
        Some(trust) => {
            let (text, row) =
                crate::trust::new_token(REJOIN_TTL, 1, node, false).map_err(CallError::Refused)?;
            state
                .store
                .put_token(&row)
                .map_err(|e| CallError::Refused(format!("join token: {e}")))?;
            (Some(trust.fingerprint()), Some(text))
        }
        None => (None, None),
    };
    let master = advertise.master_ref(&key, fingerprint.as_deref(), join.as_deref());
    let address = state
        .address(node)
        .ok_or_else(|| CallError::Refused(format!("node {node} is unknown")))?;
    let req = pb::ReimageRequest {
        version: version.to_string(),
        kernel_url: master.artifact_url(version, "vmlinuz"),
        initramfs_url: master.artifact_url(version, "initramfs.cpio.gz"),
        cmdline: master.cmdline(&image.kernel_cmdline),
        manifest: image.manifest,
        manifest_signature: image.signature,
    };
    state.calls.reimage(node, &address, req, REIMAGE_CALL).await
}

/// Writes the engine's copy of the rollout, keeping an operator's pause or abort that
/// came while the engine worked (the engine's own failure or finish still wins).
fn save(state: &MasterState, r: &mut Rollout, seen: RolloutState) -> Result<(), StoreError> {
    let _write = state
        .rollout_write
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(stored) = state.store.last_rollout()?
        && stored.id == r.id
        && stored.state != seen
        && r.state == seen
    {
        r.state = stored.state;
        r.message = stored.message;
    }
    state.store.put_rollout(r)?;
    Ok(())
}

/// One step of the current rollout, if there is one that is not over.
pub async fn tick(state: &Arc<MasterState>) -> Result<(), StoreError> {
    let Some(mut r) = state.store.last_rollout()? else {
        return Ok(());
    };
    if !r.state.is_active() {
        return Ok(());
    }
    let before = r.clone();
    let seen = r.state;
    for i in 0..r.nodes.len() {
        if r.nodes[i].phase.in_progress() {
            advance(state, &mut r, i, seen).await?;
            // A failure stops the rollout: nodes not yet touched stay as they are.
            if !r.state.is_active() {
                break;
            }
        }
    }
    for i in r.to_start() {
        let node = r.nodes[i].node.clone();
        if let Err(e) = crate::admin::set_cordon(state, &node, true).await {
            r.set_phase(
                i,
                Phase::Failed,
                format!("cordon: {}", e.message()),
                unix_ms(),
            );
            break;
        }
        tracing::info!(rollout = r.id, %node, "rollout: draining");
        r.set_phase(i, Phase::Draining, "cordoned; draining".into(), unix_ms());
    }
    if r != before {
        save(state, &mut r, seen)?;
    }
    Ok(())
}

async fn advance(
    state: &Arc<MasterState>,
    r: &mut Rollout,
    i: usize,
    seen: RolloutState,
) -> Result<(), StoreError> {
    let node = r.nodes[i].node.clone();
    let now = unix_ms();
    match r.nodes[i].phase {
        Phase::Draining => {
            let mut mem = DrainMemory {
                evicted: r.nodes[i].evicted.iter().cloned().collect(),
                stopping: r.nodes[i].stopping.iter().cloned().collect(),
            };
            let report = drain_step(state, &node, 0, &mut mem).await?;
            let n = &mut r.nodes[i];
            n.evicted = mem.evicted.into_iter().collect();
            n.stopping = mem.stopping.into_iter().collect();
            n.message = report.message.clone();
            if report.done {
                r.set_phase(
                    i,
                    Phase::Reimaging,
                    format!("drained; reimaging to {}", r.to_version),
                    now,
                );
                // Recorded before the call: a crash now repeats the call, not the drain.
                save(state, r, seen)?;
                reimage(state, r, i).await?;
            } else if now.saturating_sub(r.nodes[i].since_ms) > r.drain_timeout_ms {
                let why = format!(
                    "drain did not finish within {} s: {}",
                    r.drain_timeout_ms / 1000,
                    report.message
                );
                uncordon(state, &node).await;
                r.set_phase(i, Phase::Failed, why, now);
            }
        }
        Phase::Reimaging => {
            // The master stopped between recording the phase and hearing the answer.
            let back = node_now(state, &node);
            if back.boot_id != r.nodes[i].from_boot_id && !back.boot_id.is_empty() {
                r.set_phase(i, Phase::Booting, "rebooted".into(), now);
            } else {
                reimage(state, r, i).await?;
            }
        }
        Phase::Booting => match r.boot_outcome(i, &node_now(state, &node), now) {
            None => {}
            Some(Ok(())) => {
                uncordon(state, &node).await;
                tracing::info!(rollout = r.id, %node, version = %r.to_version, "rollout: node done");
                r.set_phase(i, Phase::Done, format!("back on {}", r.to_version), now);
            }
            Some(Err(why)) => rollback(state, r, i, why).await?,
        },
        _ => {}
    }
    Ok(())
}

async fn reimage(state: &Arc<MasterState>, r: &mut Rollout, i: usize) -> Result<(), StoreError> {
    let node = r.nodes[i].node.clone();
    // A reboot that falls back to PXE must find the new version assigned.
    set_boot_version(state, &node, &r.to_version).await?;
    match send_reimage(state, &node, &r.to_version).await {
        Ok(msg) => {
            tracing::info!(rollout = r.id, %node, %msg, "rollout: node reimaging");
            r.set_phase(i, Phase::Booting, msg, unix_ms());
        }
        Err(CallError::Unreached(why)) => {
            // The node may not have heard it: ask again next time, within the ready
            // timeout, which bounds the whole reimage.
            let n = &r.nodes[i];
            if unix_ms().saturating_sub(n.since_ms) > r.ready_timeout_ms {
                rollback(state, r, i, format!("unreachable for Reimage: {why}")).await?;
            } else {
                r.nodes[i].message = format!("not reached yet ({why}); asking again");
            }
        }
        Err(CallError::Refused(why)) => {
            tracing::warn!(rollout = r.id, %node, %why, "rollout: node refused the reimage");
            set_boot_version(state, &node, &r.nodes[i].from_version).await?;
            uncordon(state, &node).await;
            let from = r.nodes[i].from_version.clone();
            r.set_phase(
                i,
                Phase::Failed,
                format!("refused: {why} (still on {from})"),
                unix_ms(),
            );
        }
    }
    Ok(())
}

/// The node did not come back right: it boots its old version again.
async fn rollback(
    state: &Arc<MasterState>,
    r: &mut Rollout,
    i: usize,
    why: String,
) -> Result<(), StoreError> {
    let node = r.nodes[i].node.clone();
    let from = r.nodes[i].from_version.clone();
    set_boot_version(state, &node, &from).await?;
    let now = node_now(state, &node);
    let what = if now.ready && now.image_version == from {
        uncordon(state, &node).await;
        format!("{why}; it runs {from}")
    } else if now.ready && !from.is_empty() {
        match send_reimage(state, &node, &from)
            .await
            .map_err(|e| e.to_string())
        {
            Ok(_) => format!("{why}; sent back to {from}"),
            Err(e) => format!("{why}; sending it back to {from} failed: {e}"),
        }
    } else {
        format!("{why}; it boots {from} by PXE when it restarts, and stays cordoned")
    };
    tracing::warn!(rollout = r.id, %node, %what, "rollout: node rolled back");
    r.set_phase(i, Phase::RolledBack, what, unix_ms());
    Ok(())
}

//! The placement loop: pending tasks from the store, the fleet as the poller sees it, one
//! call of the scheduler, and its decisions carried out (recorded in the store, victims
//! killed, then `RunTask` on the chosen node). A task whose RunTask fails goes back to
//! pending. A started task stays ASSIGNED until a poll sees it running
//! ([`crate::reconcile`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use celld_proto::v1 as pb;

use crate::control::resources;
use crate::jobfile::{JobSpec, Resources, RestartMode};
use crate::poll::Liveness;
use crate::scheduler::{Decision, NodeView, PendingTask, PlacedTask, schedule};
use crate::server::MasterState;
use crate::store::{StoreError, TaskRow, TaskState};

/// The `TaskSpec` celld runs for replica `task_id` of `job`.
pub fn task_spec(task_id: &str, job: &JobSpec) -> pb::TaskSpec {
    pb::TaskSpec {
        id: task_id.to_string(),
        job: job.name.clone(),
        argv: job.argv.clone(),
        env: job.env.clone().into_iter().collect(),
        rootfs: job.rootfs.clone(),
        resources: Some(pb::Resources {
            memory_bytes: job.resources.memory_bytes,
            cpu_millis: job.resources.cpu_millis,
            pids_max: job.resources.pids_max,
        }),
        priority: job.priority.min(i32::MAX as u32) as i32,
        kill_grace_ms: job.kill_grace_ms,
        restart_policy: Some(pb::RestartPolicy {
            mode: match job.restart.mode {
                RestartMode::Never => pb::restart_policy::Mode::Never,
                RestartMode::OnFailure => pb::restart_policy::Mode::OnFailure,
                RestartMode::Always => pb::restart_policy::Mode::Always,
            } as i32,
            max_restarts: job.restart.max_restarts,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The scheduler's view of the fleet: Ready from the poller, cordons from the master and
/// the nodes, resources used by the tasks the store has on each node.
fn node_views(state: &MasterState, tasks: &[TaskRow]) -> Vec<NodeView> {
    let registry = state.registry();
    let fleet = state.fleet.lock().unwrap_or_else(|p| p.into_inner());
    registry
        .records
        .iter()
        .map(|(id, r)| {
            let mut used = Resources::default();
            for t in tasks
                .iter()
                .filter(|t| t.node.as_deref() == Some(id) && t.state.is_on_node())
            {
                used.memory_bytes += t.resources.memory_bytes;
                used.cpu_millis += t.resources.cpu_millis;
            }
            NodeView {
                id: id.clone(),
                ready: fleet.get(id).is_some_and(|h| h.liveness == Liveness::Ready),
                cordoned: r.cordoned || r.node_cordoned,
                labels: r.labels.clone(),
                allocatable: resources(r.allocatable),
                used,
            }
        })
        .collect()
}

/// One pass: schedules what is pending, records each decision in the store (victims
/// PREEMPTED, the task ASSIGNED as its next attempt), stops the victims and starts the
/// tasks on their nodes (all nodes at once). Returns the reasons of tasks left pending,
/// by task id.
pub async fn place_pending(
    state: &Arc<MasterState>,
) -> Result<BTreeMap<String, String>, StoreError> {
    let _control = state.control.lock().await;
    let store = &state.store;
    let tasks = store.list_tasks()?;
    if !tasks.iter().any(|t| t.state.wants_node()) {
        return Ok(BTreeMap::new());
    }
    let jobs: BTreeMap<String, JobSpec> = store
        .list_jobs()?
        .into_iter()
        .map(|j| (j.name, j.spec))
        .collect();
    let nodes = node_views(state, &tasks);
    let placed: Vec<PlacedTask> = tasks
        .iter()
        .filter(|t| t.state.is_on_node())
        .filter_map(|t| {
            Some(PlacedTask {
                task_id: t.id.clone(),
                job: t.job.clone(),
                node: t.node.clone()?,
                priority: t.priority,
                resources: t.resources,
            })
        })
        .collect();
    let pending: Vec<PendingTask> = tasks
        .iter()
        .filter(|t| t.state.wants_node())
        .map(|t| PendingTask {
            task_id: t.id.clone(),
            job: t.job.clone(),
            priority: t.priority,
            resources: t.resources,
            constraints: jobs
                .get(&t.job)
                .map(|j| j.constraints.clone())
                .unwrap_or_default(),
        })
        .collect();
    let mut waiting = BTreeMap::new();
    let mut starts = tokio::task::JoinSet::new();
    for decision in schedule(&nodes, &placed, &pending) {
        let (task_id, node, victims) = match decision {
            Decision::Place { task_id, node } => (task_id, node, Vec::new()),
            Decision::Preempt {
                task_id,
                node,
                victims,
            } => (task_id, node, victims),
            Decision::Pending { task_id, reason } => {
                waiting.insert(task_id, reason);
                continue;
            }
        };
        let Some(job) = tasks
            .iter()
            .find(|t| t.id == task_id)
            .and_then(|t| jobs.get(&t.job))
        else {
            continue;
        };
        // The victims' attempts as they run now, before the store forgets their node.
        let victim_ids: Vec<String> = tasks
            .iter()
            .filter(|t| victims.contains(&t.id))
            .map(TaskRow::node_task_id)
            .collect();
        let (_, row) = store.place_task(&task_id, &node, &victims)?;
        state.note_placed(&task_id);
        let spec = task_spec(&row.node_task_id(), job);
        let state = state.clone();
        starts.spawn(async move {
            for v in &victim_ids {
                tracing::info!(victim = %v, for_task = %task_id, %node, "preempting");
                state.kill_on_node(&node, v, 0).await;
            }
            let result = match state.address(&node) {
                Some(address) => state.calls.run_task(&node, &address, spec).await,
                None => Err(format!("node {node} is unknown")),
            };
            (task_id, node, result)
        });
    }
    while let Some(joined) = starts.join_next().await {
        let Ok((task_id, node, result)) = joined else {
            continue;
        };
        match result {
            Ok(()) => tracing::info!(task = %task_id, %node, "task started"),
            Err(e) => {
                tracing::warn!(task = %task_id, %node, error = %e, "RunTask failed");
                // Only if it is still this placement: a poll may have moved it meanwhile.
                if store.get_task(&task_id)?.is_some_and(|t| {
                    t.state == TaskState::Assigned && t.node.as_deref() == Some(&node)
                }) {
                    store.set_task_state(
                        &task_id,
                        TaskState::Pending,
                        &format!("RunTask on {node} failed: {e}"),
                    )?;
                }
            }
        }
    }
    Ok(waiting)
}

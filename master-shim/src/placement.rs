//! The placement loop: pending tasks from the store, the fleet as the poller sees it, one
//! call of the scheduler, and its decisions carried out (recorded in the store, then
//! `RunTask` on the chosen node). A task whose RunTask fails goes back to pending.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use celld_proto::v1 as pb;

use crate::jobfile::{JobSpec, Resources, RestartMode};
use crate::poll::Liveness;
use crate::scheduler::{Decision, NodeView, PendingTask, PlacedTask, schedule};
use crate::server::MasterState;
use crate::store::{Store, StoreError, TaskState};

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

fn resources(r: Option<pb::Resources>) -> Resources {
    let r = r.unwrap_or_default();
    Resources {
        memory_bytes: r.memory_bytes,
        cpu_millis: r.cpu_millis,
        pids_max: r.pids_max,
    }
}

/// One pass: schedules what is pending and starts it on its node. Returns the reasons of
/// tasks left pending, by task id.
pub async fn place_pending(
    state: &Arc<MasterState>,
    store: &Arc<dyn Store>,
) -> Result<BTreeMap<String, String>, StoreError> {
    let tasks = store.list_tasks()?;
    let jobs: BTreeMap<String, JobSpec> = store
        .list_jobs()?
        .into_iter()
        .map(|j| (j.name, j.spec))
        .collect();
    let nodes: Vec<NodeView> = {
        let registry = state.registry.lock().unwrap_or_else(|p| p.into_inner());
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
                    cordoned: r.cordoned,
                    labels: r.labels.clone(),
                    allocatable: resources(r.allocatable),
                    used,
                }
            })
            .collect()
    };
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
    for decision in schedule(&nodes, &placed, &pending) {
        match decision {
            Decision::Place { task_id, node } => {
                let Some(job) = tasks
                    .iter()
                    .find(|t| t.id == task_id)
                    .and_then(|t| jobs.get(&t.job))
                else {
                    continue;
                };
                store.place_task(&task_id, &node, &[])?;
                let address = {
                    let fleet = state.fleet.lock().unwrap_or_else(|p| p.into_inner());
                    fleet
                        .get(&node)
                        .map(|h| h.address.clone())
                        .unwrap_or_default()
                };
                match run_on_node(&address, task_spec(&task_id, job)).await {
                    Ok(()) => {
                        tracing::info!(task = %task_id, %node, "task placed");
                        store.set_task_state(&task_id, TaskState::Running, "started")?;
                    }
                    Err(e) => {
                        tracing::warn!(task = %task_id, %node, error = %e, "RunTask failed");
                        store.set_task_state(
                            &task_id,
                            TaskState::Pending,
                            &format!("RunTask on {node} failed: {e}"),
                        )?;
                    }
                }
            }
            // Preemption is decided but not yet carried out: the task waits.
            Decision::Preempt { task_id, node, .. } => {
                waiting.insert(
                    task_id,
                    format!("would preempt on {node} (not yet enabled)"),
                );
            }
            Decision::Pending { task_id, reason } => {
                waiting.insert(task_id, reason);
            }
        }
    }
    Ok(waiting)
}

async fn run_on_node(address: &str, spec: pb::TaskSpec) -> Result<(), String> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    pb::node_client::NodeClient::new(channel)
        .run_task(pb::RunTaskRequest { spec: Some(spec) })
        .await
        .map(drop)
        .map_err(|s| format!("{}: {}", s.code(), s.message()))
}

//! Draining a node: cordon it, then evict its tasks a few at a time so that no job has
//! more replicas down than its disruption budget allows, and wait until every evicted
//! task runs elsewhere. Progress goes to the caller as it happens.
//!
//! A replica counts as unavailable while it wants a node or is placed but not yet seen
//! running (pending, assigned, lost, preempted, evicted); finished replicas (succeeded,
//! failed, killed) do not count. A task is evicted only when its job's unavailable count,
//! with this eviction, stays within `budget.max_unavailable`. Lowest priority first.
//! The drain is done when nothing of the master's is left on the node, every evicted task
//! runs elsewhere, and the node says the evicted copies have stopped.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use celld_proto::v1 as pb;
use tokio::sync::mpsc;
use tonic::Status;

use crate::admin::internal;
use crate::jobfile::JobSpec;
use crate::server::MasterState;
use crate::store::{StoreError, TaskRow, TaskState};

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

fn unavailable(state: TaskState) -> bool {
    state.wants_node() || state == TaskState::Assigned
}

/// What one step decided.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Step {
    /// Tasks to evict now.
    pub evict: Vec<String>,
    /// Jobs holding the drain up, with their unavailable count and budget.
    pub blocked: BTreeMap<String, (u32, u32)>,
}

/// Pure: which tasks on `node` may be evicted now.
pub fn step(node: &str, tasks: &[TaskRow], jobs: &BTreeMap<String, JobSpec>) -> Step {
    let mut down: BTreeMap<&str, u32> = BTreeMap::new();
    for t in tasks.iter().filter(|t| unavailable(t.state)) {
        *down.entry(t.job.as_str()).or_default() += 1;
    }
    let mut on_node: Vec<&TaskRow> = tasks
        .iter()
        .filter(|t| t.node.as_deref() == Some(node) && t.state.is_on_node())
        .collect();
    on_node.sort_by(|a, b| a.priority.cmp(&b.priority).then(a.id.cmp(&b.id)));
    let mut out = Step::default();
    for t in on_node {
        let budget = jobs.get(&t.job).map_or(1, |j| j.budget.max_unavailable);
        let now = down.entry(t.job.as_str()).or_default();
        // An assigned task on this node counts as down already; evicting it adds nothing.
        let extra = u32::from(t.state == TaskState::Running);
        if *now + extra <= budget {
            *now += extra;
            out.evict.push(t.id.clone());
        } else {
            out.blocked.insert(t.job.clone(), (*now, budget));
        }
    }
    out
}

/// Drains `r.node`, sending progress on `tx` until done, failed or the caller leaves.
pub async fn drain(
    state: Arc<MasterState>,
    r: pb::DrainNodeRequest,
    tx: mpsc::Sender<Result<pb::DrainProgress, Status>>,
) {
    let result = run(&state, &r, &tx).await;
    if let Err(status) = result {
        let _ = tx.send(Err(status)).await;
    }
}

/// What a drain remembers between steps (the rollout keeps it in its store row).
#[derive(Debug, Default, Clone)]
pub struct DrainMemory {
    /// Tasks this drain evicted.
    pub evicted: BTreeSet<String>,
    /// The evicted attempts as they run on the node, until the node says they ended.
    pub stopping: BTreeSet<String>,
}

/// Where a drain stands after a step.
#[derive(Debug, Clone)]
pub struct StepReport {
    /// The master's tasks still on the node.
    pub remaining: usize,
    /// Evicted tasks not yet running elsewhere.
    pub waiting: usize,
    pub message: String,
    pub done: bool,
}

/// One step of draining `node` (already cordoned): evicts what the budgets allow now
/// and says how far the drain is.
pub async fn drain_step(
    state: &Arc<MasterState>,
    node: &str,
    grace_ms: u32,
    mem: &mut DrainMemory,
) -> Result<StepReport, StoreError> {
    let (remaining, waiting, message) = {
        let _control = state.control.lock().await;
        let (tasks, jobs) = read(state)?;
        let s = step(node, &tasks, &jobs);
        let mut message = Vec::new();
        for id in &s.evict {
            let Some(t) = tasks.iter().find(|t| &t.id == id) else {
                continue;
            };
            let grace = if grace_ms > 0 {
                grace_ms
            } else {
                jobs.get(&t.job).map_or(0, |j| j.kill_grace_ms)
            };
            state.store.set_task_state(
                id,
                TaskState::Evicted,
                &format!("evicted by a drain of {node}"),
            )?;
            state.kill_on_node(node, &t.node_task_id(), grace).await;
            mem.stopping.insert(t.node_task_id());
            mem.evicted.insert(id.clone());
            message.push(format!("evicted {id}"));
        }
        for (job, (down, budget)) in &s.blocked {
            message.push(format!(
                "job {job}: {down} replica(s) unavailable, budget {budget}: waiting"
            ));
        }
        let remaining = tasks
            .iter()
            .filter(|t| t.node.as_deref() == Some(node) && t.state.is_on_node())
            .count()
            - s.evict.len();
        let waiting: Vec<&TaskRow> = tasks
            .iter()
            .filter(|t| {
                // Those evicted just now still read as running in `tasks`.
                s.evict.contains(&t.id) || (mem.evicted.contains(&t.id) && unavailable(t.state))
            })
            .collect();
        if message.is_empty() && !waiting.is_empty() {
            let names: Vec<&str> = waiting.iter().map(|t| t.id.as_str()).collect();
            message.push(format!("waiting for {} to run elsewhere", names.join(", ")));
        }
        (remaining, waiting.len(), message.join("; "))
    };
    let mut message = message;
    if remaining == 0 && waiting == 0 && !mem.stopping.is_empty() {
        mem.stopping = still_running(state, node, std::mem::take(&mut mem.stopping)).await;
        if !mem.stopping.is_empty() {
            let names: Vec<&str> = mem.stopping.iter().map(String::as_str).collect();
            message = format!("waiting for {} to stop on {node}", names.join(", "));
        }
    }
    let done = remaining == 0 && waiting == 0 && mem.stopping.is_empty();
    if done {
        message = format!(
            "{node} drained: {} task(s) evicted, all running elsewhere",
            mem.evicted.len()
        );
    }
    Ok(StepReport {
        remaining,
        waiting,
        message,
        done,
    })
}

async fn run(
    state: &Arc<MasterState>,
    r: &pb::DrainNodeRequest,
    tx: &mpsc::Sender<Result<pb::DrainProgress, Status>>,
) -> Result<(), Status> {
    let node = r.node.as_str();
    crate::admin::set_cordon(state, node, true).await?;
    let timeout = match r.timeout_ms {
        0 => DEFAULT_TIMEOUT,
        ms => Duration::from_millis(u64::from(ms)),
    };
    let deadline = tokio::time::Instant::now() + timeout;
    let pause = (state.policy.interval / 2).max(Duration::from_millis(100));
    let mut mem = DrainMemory::default();
    let mut last = String::new();
    loop {
        let report = drain_step(state, node, r.grace_ms, &mut mem)
            .await
            .map_err(internal)?;
        if report.message != last || report.done {
            let progress = pb::DrainProgress {
                message: report.message.clone(),
                evicted: mem.evicted.iter().cloned().collect(),
                remaining: report.remaining as u32,
                waiting: report.waiting as u32,
                done: report.done,
            };
            if tx.send(Ok(progress)).await.is_err() {
                tracing::info!(%node, "drain abandoned by its caller; the node stays cordoned");
                return Ok(());
            }
            last = report.message;
        }
        if report.done {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Status::deadline_exceeded(format!(
                "drain of {node} timed out after {} s with {} task(s) on it and \
                 {} evicted task(s) not running elsewhere; the node stays cordoned",
                timeout.as_secs(),
                report.remaining,
                report.waiting
            )));
        }
        tokio::time::sleep(pause).await;
    }
}

/// Those of `ids` that the node still runs. A node that cannot be asked runs nothing
/// the drain can wait for (it is down, or its tasks are lost to the master anyway).
async fn still_running(state: &MasterState, node: &str, ids: BTreeSet<String>) -> BTreeSet<String> {
    let Some(address) = state.address(node) else {
        return BTreeSet::new();
    };
    match state.calls.list_tasks(node, &address).await {
        Ok(tasks) => tasks
            .into_iter()
            .filter(|t| ids.contains(&t.id))
            .filter(|t| {
                t.state != pb::TaskState::Dead as i32 && t.state != pb::TaskState::Evicted as i32
            })
            .map(|t| t.id)
            .collect(),
        Err(e) => {
            tracing::warn!(%node, error = %e, "drain: cannot ask the node whether its tasks stopped");
            BTreeSet::new()
        }
    }
}

fn read(state: &MasterState) -> Result<(Vec<TaskRow>, BTreeMap<String, JobSpec>), StoreError> {
    let tasks = state.store.list_tasks()?;
    let jobs = state
        .store
        .list_jobs()?
        .into_iter()
        .map(|j| (j.name, j.spec))
        .collect();
    Ok((tasks, jobs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobfile::parse_job;

    fn task(id: &str, node: Option<&str>, state: TaskState, priority: u32) -> TaskRow {
        TaskRow {
            id: id.into(),
            job: id.rsplit_once('-').unwrap().0.into(),
            replica: 0,
            node: node.map(Into::into),
            state,
            reason: String::new(),
            priority,
            resources: Default::default(),
            attempt: 1,
        }
    }

    fn jobs(budgets: &[(&str, u32, u32)]) -> BTreeMap<String, JobSpec> {
        budgets
            .iter()
            .map(|(name, replicas, max)| {
                let text = format!(
                    "name = \"{name}\"\nreplicas = {replicas}\nargv = [\"x\"]\nrootfs = \"/r\"\n\
                     [resources]\nmemory = \"1MiB\"\ncpu_millis = 1\n[budget]\nmax_unavailable = {max}\n"
                );
                (name.to_string(), parse_job(&text).unwrap())
            })
            .collect()
    }

    #[test]
    fn evicts_within_each_jobs_budget_lowest_priority_first() {
        let tasks = [
            task("web-0", Some("n1"), TaskState::Running, 100),
            task("web-1", Some("n1"), TaskState::Running, 100),
            task("web-2", Some("n2"), TaskState::Running, 100),
            task("batch-0", Some("n1"), TaskState::Running, 10),
        ];
        let s = step("n1", &tasks, &jobs(&[("web", 3, 1), ("batch", 1, 1)]));
        assert_eq!(s.evict, ["batch-0", "web-0"]);
        assert_eq!(s.blocked["web"], (1, 1));
    }

    #[test]
    fn a_job_with_a_replica_down_elsewhere_waits() {
        let tasks = [
            task("web-0", Some("n1"), TaskState::Running, 100),
            task("web-1", None, TaskState::Lost, 100),
        ];
        let s = step("n1", &tasks, &jobs(&[("web", 2, 1)]));
        assert!(s.evict.is_empty());
        assert_eq!(s.blocked["web"], (1, 1));
        // With a budget of 2 it may go.
        let s = step("n1", &tasks, &jobs(&[("web", 2, 2)]));
        assert_eq!(s.evict, ["web-0"]);
    }

    #[test]
    fn assigned_tasks_leave_without_spending_budget() {
        let tasks = [
            task("web-0", Some("n1"), TaskState::Assigned, 100),
            task("web-1", Some("n1"), TaskState::Running, 100),
        ];
        let s = step("n1", &tasks, &jobs(&[("web", 2, 1)]));
        // web-0 already counts as down (1 of 1): it may go, web-1 may not.
        assert_eq!(s.evict, ["web-0"]);
        assert_eq!(s.blocked["web"], (1, 1));
    }

    #[test]
    fn finished_replicas_do_not_count() {
        let tasks = [
            task("web-0", Some("n1"), TaskState::Running, 100),
            task("web-1", None, TaskState::Succeeded, 100),
            task("web-2", None, TaskState::Killed, 100),
        ];
        let s = step("n1", &tasks, &jobs(&[("web", 3, 1)]));
        assert_eq!(s.evict, ["web-0"]);
    }
}

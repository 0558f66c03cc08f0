//! Reconciliation, pure: what the master expects on a node (the store's tasks placed
//! there) against what the node says it runs (a `GetStatus` reply), and the actions that
//! bring the two together. No I/O and no clock: the caller says which placements are too
//! recent to judge and carries the actions out.
//!
//! The rules, for one node:
//!
//! - a task of the master's current attempt that the node runs: Assigned becomes Running;
//! - the same task ended on the node: exit 0 is Succeeded; a failure (non-zero exit, OOM,
//!   failed start, failed health check) is Failed; evicted by the node (drain, memory
//!   pressure) is Evicted, preempted by the node is Preempted, killed behind the master's
//!   back or stopped by a shutdown is Lost: those three are placed again;
//! - a task the master placed on the node that the node does not have (it rebooted, or the
//!   master died between recording a placement and starting it) is Lost and placed again,
//!   unless the placement is recent (a reply may predate it);
//! - a task of a job (the master's tasks carry their job) that the node runs but the master
//!   does not expect there (an old attempt, a task of a killed job, a task rescheduled
//!   while the node was away) is killed. Tasks with no job were started on the node by
//!   hand; the master leaves them alone.

use std::collections::{BTreeMap, BTreeSet};

use celld_proto::v1 as pb;

use crate::store::{TaskRow, TaskState};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Record a new state for the master's task.
    SetState {
        task_id: String,
        state: TaskState,
        reason: String,
    },
    /// Stop this task (by its id on the node).
    Kill { node_task_id: String, why: String },
}

fn finished(state: i32) -> bool {
    state == pb::TaskState::Dead as i32 || state == pb::TaskState::Evicted as i32
}

/// The master's state for a task the node reports as ended.
fn ended_state(t: &pb::TaskStatus, node: &str) -> (TaskState, String) {
    use pb::TaskReason as R;
    let reason = R::try_from(t.reason).unwrap_or(R::Unspecified);
    let detail = if t.message.is_empty() {
        String::new()
    } else {
        format!(": {}", t.message)
    };
    if t.state == pb::TaskState::Evicted as i32 {
        return match reason {
            R::Preempted => (TaskState::Preempted, format!("preempted on {node}{detail}")),
            _ => (
                TaskState::Evicted,
                format!("evicted by {node} ({}){detail}", reason.as_str_name()),
            ),
        };
    }
    match reason {
        R::Exited if t.exit_code == 0 => (TaskState::Succeeded, format!("exited 0 on {node}")),
        R::Exited => (
            TaskState::Failed,
            format!("exited {} on {node}{detail}", t.exit_code),
        ),
        R::OomKilled => (TaskState::Failed, format!("out of memory on {node}")),
        R::FailedToStart => (
            TaskState::Failed,
            format!("failed to start on {node}{detail}"),
        ),
        R::HealthCheckFailed => (TaskState::Failed, format!("health check failed on {node}")),
        R::Killed | R::NodeShutdown => (
            TaskState::Lost,
            format!(
                "stopped on {node} ({}) without the master",
                reason.as_str_name()
            ),
        ),
        _ => (
            TaskState::Failed,
            format!("ended on {node} ({}){detail}", reason.as_str_name()),
        ),
    }
}

/// The actions for node `node`: `expected` are the store's tasks that hold a place on it
/// (Assigned or Running), `observed` the node's tasks, `recent` the master's task ids
/// placed too recently for a missing task to mean anything.
pub fn reconcile(
    node: &str,
    expected: &[TaskRow],
    observed: &[pb::TaskStatus],
    recent: &BTreeSet<String>,
) -> Vec<Action> {
    let mut actions = Vec::new();
    let by_node_id: BTreeMap<String, &TaskRow> = expected
        .iter()
        .filter(|t| t.node.as_deref() == Some(node) && t.state.is_on_node())
        .map(|t| (t.node_task_id(), t))
        .collect();
    let mut seen = BTreeSet::new();
    for o in observed {
        match by_node_id.get(&o.id) {
            Some(t) => {
                seen.insert(o.id.clone());
                if finished(o.state) {
                    let (state, reason) = ended_state(o, node);
                    actions.push(Action::SetState {
                        task_id: t.id.clone(),
                        state,
                        reason,
                    });
                } else if o.state == pb::TaskState::Running as i32 && t.state == TaskState::Assigned
                {
                    actions.push(Action::SetState {
                        task_id: t.id.clone(),
                        state: TaskState::Running,
                        reason: format!("running on {node}"),
                    });
                }
            }
            None if !o.job.is_empty() && !finished(o.state) => {
                let why = match TaskRow::parse_node_task_id(&o.id) {
                    Some((task, attempt)) => {
                        format!("{task} attempt {attempt} is not expected on {node} (a stale copy)")
                    }
                    None => format!("{} is no task of the master's", o.id),
                };
                actions.push(Action::Kill {
                    node_task_id: o.id.clone(),
                    why,
                });
            }
            None => {}
        }
    }
    for (node_id, t) in &by_node_id {
        if !seen.contains(node_id) && !recent.contains(&t.id) {
            actions.push(Action::SetState {
                task_id: t.id.clone(),
                state: TaskState::Lost,
                reason: format!("{node} does not have it (rebooted, or it never started)"),
            });
        }
    }
    actions
}

#[cfg(test)]
mod tests;

//! The master's state (nodes, jobs, tasks) behind one trait, so a distributed store can
//! take SQLite's place later without the master changing. [`SqliteStore`] is the default:
//! one file, readable with the `sqlite3` shell.
//!
//! Each write is one transaction and moves the store's revision forward by one, so a reader
//! can tell whether anything changed since it last looked. Changes that touch several rows
//! (a job and its replicas, a placement and its victims, a node and its tasks) are single
//! methods, so a crash can never leave half of one behind. Times are Unix milliseconds
//! given by the caller: the store reads no clock.
//!
//! The store checks identity and existence, not policy: whether a placement is wise is the
//! scheduler's business.

use std::collections::BTreeMap;

use crate::jobfile::{JobSpec, Resources};
use crate::rollout::Rollout;

mod sqlite;

pub use sqlite::SqliteStore;

/// The number a write moves the store to; strictly increasing.
pub type Revision = u64;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {op}")]
    Sqlite {
        op: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("store: job {job}: its spec is not valid JSON")]
    Json {
        job: String,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "store schema version {found} is newer than this cellmaster understands ({supported}): \
         run a newer cellmaster"
    )]
    SchemaTooNew { found: i64, supported: i64 },
    #[error("{kind} {id} does not exist")]
    NotFound { kind: &'static str, id: String },
    #[error("{kind} {id} already exists")]
    AlreadyExists { kind: &'static str, id: String },
    #[error("store: {what} holds {value:?}, which this cellmaster does not know")]
    Corrupt { what: &'static str, value: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NodeState {
    /// Registered or listed, not heard from lately.
    #[default]
    Unknown,
    Ready,
    /// Missed enough polls that its tasks were taken back.
    Down,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeRow {
    pub id: String,
    /// The machine that owns this id; another machine claiming it is refused.
    pub machine_id: String,
    /// host:port to poll.
    pub address: String,
    pub labels: BTreeMap<String, String>,
    pub state: NodeState,
    pub cordoned: bool,
    pub boot_id: String,
    pub image_version: String,
    pub allocatable: Resources,
    /// Unix ms of the last reply; 0 for never.
    pub last_seen_ms: u64,
    /// Its network cards, lowercase `aa:bb:..`: how a PXE-booting machine is recognised.
    pub macs: Vec<String>,
    /// The image version it boots by PXE; empty for the master's default.
    pub boot_version: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRow {
    pub name: String,
    pub spec: JobSpec,
    pub created_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TaskState {
    /// Waiting for the scheduler.
    Pending,
    /// Placed on a node, not yet seen running there.
    Assigned,
    Running,
    Succeeded,
    Failed,
    /// Its node went Down; to be placed again.
    Lost,
    /// Made room for a higher-priority task; to be placed again.
    Preempted,
    /// Moved off by a drain; to be placed again.
    Evicted,
    /// Stopped on request; not placed again.
    Killed,
}

impl TaskState {
    const ALL: [TaskState; 9] = [
        Self::Pending,
        Self::Assigned,
        Self::Running,
        Self::Succeeded,
        Self::Failed,
        Self::Lost,
        Self::Preempted,
        Self::Evicted,
        Self::Killed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Assigned => "assigned",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Lost => "lost",
            Self::Preempted => "preempted",
            Self::Evicted => "evicted",
            Self::Killed => "killed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// Holds resources on its node.
    pub fn is_on_node(self) -> bool {
        matches!(self, Self::Assigned | Self::Running)
    }

    /// Ended for good; the task keeps the node it ran on, for its logs.
    pub fn is_finished(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Killed)
    }

    /// Wants a node: what the scheduler should place.
    pub fn wants_node(self) -> bool {
        matches!(
            self,
            Self::Pending | Self::Lost | Self::Preempted | Self::Evicted
        )
    }
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Ready => "ready",
            Self::Down => "down",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Unknown, Self::Ready, Self::Down]
            .into_iter()
            .find(|n| n.as_str() == s)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskRow {
    /// `<job>-<replica>`, unique in the cell.
    pub id: String,
    pub job: String,
    pub replica: u32,
    /// Where it runs or is meant to; `None` while it wants a node.
    pub node: Option<String>,
    pub state: TaskState,
    /// Why it is in this state ("no node fits ...", "node n3 down").
    pub reason: String,
    pub priority: u32,
    pub resources: Resources,
    /// Placements so far; each one runs on its node as a new incarnation
    /// ([`TaskRow::node_task_id`]), so a stale copy is never mistaken for the current one.
    pub attempt: u32,
}

impl TaskRow {
    /// The id of this placement on its node: `<task>-<attempt>`.
    pub fn node_task_id(&self) -> String {
        format!("{}-{}", self.id, self.attempt)
    }

    /// Splits a node's task id into the master's task id and the attempt.
    pub fn parse_node_task_id(node_id: &str) -> Option<(&str, u32)> {
        let (task, attempt) = node_id.rsplit_once('-')?;
        if attempt.is_empty() || !attempt.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some((task, attempt.parse().ok()?))
    }

    /// The pending replica `replica` of `job`.
    pub fn pending_replica(job: &JobSpec, replica: u32) -> Self {
        Self {
            id: format!("{}-{replica}", job.name),
            job: job.name.clone(),
            replica,
            node: None,
            state: TaskState::Pending,
            reason: "waiting for the scheduler".to_string(),
            priority: job.priority,
            resources: job.resources,
            attempt: 0,
        }
    }
}

/// The master's state. Implementations must make each method atomic and durable once it
/// returns, and move the revision forward by one per write.
pub trait Store: Send + Sync {
    /// The revision of the last write (0 for a new store).
    fn revision(&self) -> Result<Revision, StoreError>;

    /// Inserts or replaces a node.
    fn put_node(&self, node: &NodeRow) -> Result<Revision, StoreError>;
    /// Reads, changes and writes one node in one transaction (`NotFound` when absent).
    fn update_node(
        &self,
        id: &str,
        change: &mut dyn FnMut(&mut NodeRow),
    ) -> Result<(Revision, NodeRow), StoreError>;
    fn get_node(&self, id: &str) -> Result<Option<NodeRow>, StoreError>;
    fn list_nodes(&self) -> Result<Vec<NodeRow>, StoreError>;
    /// Refused while tasks are assigned to it.
    fn delete_node(&self, id: &str) -> Result<Revision, StoreError>;
    /// The node becomes Down; its assigned and running tasks become Lost with no node.
    /// Returns those tasks as they are now.
    fn mark_node_down(
        &self,
        id: &str,
        reason: &str,
    ) -> Result<(Revision, Vec<TaskRow>), StoreError>;

    /// The job and all its tasks, or nothing (an existing job name or task id refuses
    /// the whole submission).
    fn submit_job(&self, job: &JobRow, tasks: &[TaskRow]) -> Result<Revision, StoreError>;
    fn get_job(&self, name: &str) -> Result<Option<JobRow>, StoreError>;
    fn list_jobs(&self) -> Result<Vec<JobRow>, StoreError>;
    /// The job and its tasks.
    fn delete_job(&self, name: &str) -> Result<Revision, StoreError>;

    /// Inserts or replaces a task; its job must exist.
    fn put_task(&self, task: &TaskRow) -> Result<Revision, StoreError>;
    fn get_task(&self, id: &str) -> Result<Option<TaskRow>, StoreError>;
    /// Every task, by id.
    fn list_tasks(&self) -> Result<Vec<TaskRow>, StoreError>;
    fn tasks_of_job(&self, job: &str) -> Result<Vec<TaskRow>, StoreError>;
    fn tasks_on_node(&self, node: &str) -> Result<Vec<TaskRow>, StoreError>;
    fn delete_task(&self, id: &str) -> Result<Revision, StoreError>;
    /// Sets a task's state and reason; a state that wants a node again clears its node
    /// (finished tasks keep theirs, to find their logs).
    fn set_task_state(
        &self,
        id: &str,
        state: TaskState,
        reason: &str,
    ) -> Result<Revision, StoreError>;
    /// Assigns the task to `node` as its next attempt and, in the same transaction, turns
    /// `victims` (tasks on that node) Preempted with no node. Returns the task as placed.
    fn place_task(
        &self,
        id: &str,
        node: &str,
        victims: &[String],
    ) -> Result<(Revision, TaskRow), StoreError>;

    /// Inserts or replaces a rollout (by id).
    fn put_rollout(&self, rollout: &Rollout) -> Result<Revision, StoreError>;
    /// The rollout with the highest id.
    fn last_rollout(&self) -> Result<Option<Rollout>, StoreError>;

    fn put_token(&self, token: &JoinToken) -> Result<(), StoreError>;
    /// Counts one use of token `id` by `node`, in one transaction, if the secret matches
    /// and it is unexpired, not used up and not bound to another node. Returns the uses
    /// left.
    fn use_token(
        &self,
        id: &str,
        secret_sha256: &str,
        node: &str,
        now: i64,
    ) -> Result<Result<u32, TokenRefusal>, StoreError>;
    /// The newest usable token made for the PXE script, as text.
    fn pxe_token(&self, now: i64) -> Result<Option<String>, StoreError>;
}

/// A join token as kept: never its secret, except a PXE token's whole text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub id: String,
    pub secret_sha256: String,
    /// Seconds since the epoch.
    pub expires_at: i64,
    pub uses_left: u32,
    /// Empty: any node; else only this node id (the tokens a reimage carries).
    pub node: String,
    pub pxe_text: Option<String>,
}

/// Why a join token was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenRefusal {
    /// No such token, or the wrong secret.
    Unknown,
    Expired(i64),
    UsedUp,
    OtherNode(String),
}

#[cfg(test)]
mod tests;

//! Placement, pure: nodes, placed tasks and pending tasks in, decisions out. No I/O, no
//! clock, no randomness, so the same inputs always give the same decisions and the master
//! can log, replay and test them. Applying a decision (writing the store, calling the
//! node, marking victims PREEMPTED and pending again) is the caller's business.
//!
//! Pending tasks go in priority order (highest first, then by task id). For each:
//!
//! 1. feasibility: the node is Ready, not cordoned, has every label the task asks for,
//!    and has the memory and CPU free (`pids_max` is a per-task cap, checked against the
//!    node's limit, not summed);
//! 2. score: best fit (the least memory and CPU left over after placing, so large holes
//!    stay whole for large tasks) plus a penalty per replica of the same job already on
//!    the node (so one machine's death takes few replicas); lowest wins, ties by node id;
//! 3. when no node is feasible, preemption: on a node where only free resources were
//!    missing, the fewest strictly-lower-priority tasks whose removal makes room; the
//!    node whose victims have the lowest highest priority wins, then the fewest victims;
//! 4. otherwise the task stays pending, with the reason counted by node.
//!
//! Every decision sees the ones before it in the same call: resources taken by earlier
//! placements, replicas placed earlier for the spread penalty, victims already chosen
//! (a task is preempted at most once). Victims are not placed again in the same call;
//! they come back as pending tasks in the next one.

use std::collections::BTreeMap;

use crate::jobfile::{Constraints, Resources, human_bytes};

/// Score units: best fit is 0..=1000 (per mille of the node left over, memory and CPU
/// averaged); each replica of the same job already on the node costs this much. At 600 a
/// job's second replica only shares a node when every other node would be left at least
/// 60 points emptier, so spreading usually wins while best fit still orders the nodes.
const SPREAD_PENALTY_PER_REPLICA: u64 = 600;

/// A node as the scheduler needs it. `used` counts every task in `placed` that is on it
/// (the caller's accounting; the scheduler subtracts victims from it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub id: String,
    pub ready: bool,
    pub cordoned: bool,
    pub labels: BTreeMap<String, String>,
    pub allocatable: Resources,
    pub used: Resources,
}

/// A task that holds resources on a node now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacedTask {
    pub task_id: String,
    pub job: String,
    pub node: String,
    pub priority: u32,
    pub resources: Resources,
}

/// A task waiting for a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingTask {
    pub task_id: String,
    pub job: String,
    pub priority: u32,
    pub resources: Resources,
    pub constraints: Constraints,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Start the task on the node.
    Place { task_id: String, node: String },
    /// Stop `victims` (all on `node`, all of strictly lower priority), then start the task
    /// there.
    Preempt {
        task_id: String,
        node: String,
        victims: Vec<String>,
    },
    /// No node now; `reason` says why, for `cellmaster describe`.
    Pending { task_id: String, reason: String },
}

impl Decision {
    pub fn task_id(&self) -> &str {
        match self {
            Self::Place { task_id, .. }
            | Self::Preempt { task_id, .. }
            | Self::Pending { task_id, .. } => task_id,
        }
    }

    /// The node the task goes to, if any.
    pub fn node(&self) -> Option<&str> {
        match self {
            Self::Place { node, .. } | Self::Preempt { node, .. } => Some(node),
            Self::Pending { .. } => None,
        }
    }
}

/// Why one node cannot take a task, in the order the checks run. The order of the
/// variants is the order they are listed in a pending reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Refusal {
    NotReady,
    Cordoned,
    Labels,
    /// Its allocatable is smaller than the task, even empty.
    TooSmall,
    /// Large enough, but others hold what is missing.
    Full,
}

impl Refusal {
    fn describe(self, count: usize) -> String {
        let nodes = if count == 1 { "node" } else { "nodes" };
        match self {
            Self::NotReady => format!("{count} not ready"),
            Self::Cordoned => format!("{count} cordoned"),
            Self::Labels => format!("{count} {nodes} without the labels asked for"),
            Self::TooSmall => format!("{count} {nodes} too small"),
            Self::Full => {
                format!("{count} {nodes} full (not enough lower-priority tasks there to preempt)")
            }
        }
    }
}

/// A node during one call: what is free now and what is on it.
struct NodeState<'a> {
    view: &'a NodeView,
    free_memory: u64,
    free_cpu: u64,
    /// Tasks holding resources, victims removed as they are chosen.
    tasks: Vec<&'a PlacedTask>,
    /// Replicas per job, including placements made earlier in this call.
    replicas: BTreeMap<&'a str, u64>,
}

impl<'a> NodeState<'a> {
    fn new(view: &'a NodeView) -> Self {
        Self {
            view,
            free_memory: view
                .allocatable
                .memory_bytes
                .saturating_sub(view.used.memory_bytes),
            free_cpu: view
                .allocatable
                .cpu_millis
                .saturating_sub(view.used.cpu_millis),
            tasks: Vec::new(),
            replicas: BTreeMap::new(),
        }
    }

    /// The checks that do not depend on what is free.
    fn static_refusal(&self, task: &PendingTask) -> Option<Refusal> {
        let v = self.view;
        if !v.ready {
            return Some(Refusal::NotReady);
        }
        if v.cordoned {
            return Some(Refusal::Cordoned);
        }
        let labels_ok = task
            .constraints
            .labels
            .iter()
            .all(|(k, want)| v.labels.get(k) == Some(want));
        if !labels_ok {
            return Some(Refusal::Labels);
        }
        let r = &task.resources;
        // A node that reports no pid limit (0) does not refuse on it.
        let pids_too_many = v.allocatable.pids_max > 0 && r.pids_max > v.allocatable.pids_max;
        if r.memory_bytes > v.allocatable.memory_bytes
            || r.cpu_millis > v.allocatable.cpu_millis
            || pids_too_many
        {
            return Some(Refusal::TooSmall);
        }
        None
    }

    fn has_room(&self, r: &Resources) -> bool {
        r.memory_bytes <= self.free_memory && r.cpu_millis <= self.free_cpu
    }

    /// Lower is better: best fit plus the spread penalty.
    fn score(&self, task: &PendingTask) -> u64 {
        let left = |free: u64, want: u64, total: u64| -> u64 {
            if total == 0 {
                return 0;
            }
            // u128: bytes times 1000 can pass u64 on very large nodes.
            let per_mille = u128::from(free.saturating_sub(want)) * 1000 / u128::from(total);
            u64::try_from(per_mille).unwrap_or(1000)
        };
        let a = &self.view.allocatable;
        let best_fit = (left(
            self.free_memory,
            task.resources.memory_bytes,
            a.memory_bytes,
        ) + left(self.free_cpu, task.resources.cpu_millis, a.cpu_millis))
            / 2;
        let same_job = self.replicas.get(task.job.as_str()).copied().unwrap_or(0);
        best_fit + SPREAD_PENALTY_PER_REPLICA * same_job
    }

    fn take(&mut self, task: &'a PendingTask) {
        self.free_memory = self.free_memory.saturating_sub(task.resources.memory_bytes);
        self.free_cpu = self.free_cpu.saturating_sub(task.resources.cpu_millis);
        *self.replicas.entry(task.job.as_str()).or_default() += 1;
    }

    fn evict(&mut self, victim: &PlacedTask) {
        self.free_memory = self
            .free_memory
            .saturating_add(victim.resources.memory_bytes);
        self.free_cpu = self.free_cpu.saturating_add(victim.resources.cpu_millis);
        self.tasks.retain(|t| t.task_id != victim.task_id);
        if let Some(n) = self.replicas.get_mut(victim.job.as_str()) {
            *n = n.saturating_sub(1);
        }
    }

    /// The smallest set of strictly-lower-priority tasks whose removal makes room, or
    /// `None` when even all of them would not.
    fn victims_for(&self, task: &PendingTask) -> Option<Vec<&'a PlacedTask>> {
        let need_memory = task.resources.memory_bytes.saturating_sub(self.free_memory);
        let need_cpu = task.resources.cpu_millis.saturating_sub(self.free_cpu);
        let mut candidates: Vec<&'a PlacedTask> = self
            .tasks
            .iter()
            .copied()
            .filter(|t| t.priority < task.priority)
            .collect();
        // Lowest priority first; among equals the larger first, so fewer are needed.
        candidates.sort_by(|a, b| {
            a.priority
                .cmp(&b.priority)
                .then(b.resources.memory_bytes.cmp(&a.resources.memory_bytes))
                .then(b.resources.cpu_millis.cmp(&a.resources.cpu_millis))
                .then(a.task_id.cmp(&b.task_id))
        });
        let (mut memory, mut cpu) = (0u64, 0u64);
        let mut chosen = Vec::new();
        for t in candidates {
            if memory >= need_memory && cpu >= need_cpu {
                break;
            }
            memory = memory.saturating_add(t.resources.memory_bytes);
            cpu = cpu.saturating_add(t.resources.cpu_millis);
            chosen.push(t);
        }
        if memory < need_memory || cpu < need_cpu {
            return None;
        }
        // Greedy may have taken a small task that a later, larger one made unnecessary:
        // give back those not needed, the highest priority first.
        let mut i = chosen.len();
        while i > 0 {
            i -= 1;
            let t = chosen[i];
            let (m, c) = (
                memory - t.resources.memory_bytes,
                cpu - t.resources.cpu_millis,
            );
            if m >= need_memory && c >= need_cpu {
                memory = m;
                cpu = c;
                chosen.remove(i);
            }
        }
        Some(chosen)
    }
}

/// Places `pending` on `nodes`, preempting lower-priority `placed` tasks where nothing
/// else works. One decision per pending task, in the order they were considered
/// (priority, then task id). Placed tasks on nodes not in `nodes` are ignored.
pub fn schedule(
    nodes: &[NodeView],
    placed: &[PlacedTask],
    pending: &[PendingTask],
) -> Vec<Decision> {
    let mut states: Vec<NodeState> = nodes.iter().map(NodeState::new).collect();
    // Node order, not input order, decides ties.
    states.sort_by(|a, b| a.view.id.cmp(&b.view.id));
    let index: BTreeMap<&str, usize> = states
        .iter()
        .enumerate()
        .map(|(i, s)| (s.view.id.as_str(), i))
        .collect();
    for t in placed {
        if let Some(&i) = index.get(t.node.as_str()) {
            states[i].tasks.push(t);
            *states[i].replicas.entry(t.job.as_str()).or_default() += 1;
        }
    }

    let mut order: Vec<&PendingTask> = pending.iter().collect();
    order.sort_by(|a, b| {
        b.priority
            .cmp(&a.priority)
            .then_with(|| a.task_id.cmp(&b.task_id))
    });

    order
        .into_iter()
        .map(|task| decide(&mut states, task))
        .collect()
}

fn decide<'a>(states: &mut [NodeState<'a>], task: &'a PendingTask) -> Decision {
    let mut refusals: BTreeMap<Refusal, usize> = BTreeMap::new();
    let mut best: Option<(u64, usize)> = None;
    // Nodes where only free resources are missing: preemption candidates.
    let mut full: Vec<usize> = Vec::new();
    for (i, s) in states.iter().enumerate() {
        if let Some(r) = s.static_refusal(task) {
            *refusals.entry(r).or_default() += 1;
            continue;
        }
        if !s.has_room(&task.resources) {
            full.push(i);
            continue;
        }
        let score = s.score(task);
        // Strictly less: the first (lowest id) node wins a tie.
        if best.is_none_or(|(b, _)| score < b) {
            best = Some((score, i));
        }
    }

    if let Some((_, i)) = best {
        states[i].take(task);
        return Decision::Place {
            task_id: task.task_id.clone(),
            node: states[i].view.id.clone(),
        };
    }

    // Cheapest preemption: the lowest highest-victim-priority, then fewest victims, then
    // node id (the order of `full`).
    let mut cheapest: Option<((u32, usize), usize, Vec<&'a PlacedTask>)> = None;
    for &i in &full {
        let Some(victims) = states[i].victims_for(task) else {
            continue;
        };
        let cost = (
            victims.iter().map(|v| v.priority).max().unwrap_or(0),
            victims.len(),
        );
        if cheapest.as_ref().is_none_or(|(c, _, _)| cost < *c) {
            cheapest = Some((cost, i, victims));
        }
    }
    if let Some((_, i, victims)) = cheapest {
        for v in &victims {
            states[i].evict(v);
        }
        states[i].take(task);
        return Decision::Preempt {
            task_id: task.task_id.clone(),
            node: states[i].view.id.clone(),
            victims: victims.iter().map(|v| v.task_id.clone()).collect(),
        };
    }

    if !full.is_empty() {
        refusals.insert(Refusal::Full, full.len());
    }
    Decision::Pending {
        task_id: task.task_id.clone(),
        reason: pending_reason(task, &refusals),
    }
}

/// "no node fits 4 GiB memory, 1000 cpu millis: 3 nodes too small, 1 cordoned".
fn pending_reason(task: &PendingTask, refusals: &BTreeMap<Refusal, usize>) -> String {
    let r = &task.resources;
    let mut wanted = format!(
        "{} memory, {} cpu millis",
        human_bytes(r.memory_bytes),
        r.cpu_millis
    );
    if r.pids_max > 0 {
        wanted.push_str(&format!(", {} pids", r.pids_max));
    }
    if !task.constraints.labels.is_empty() {
        let labels: Vec<String> = task
            .constraints
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        wanted.push_str(&format!(" with labels {}", labels.join(",")));
    }
    if refusals.is_empty() {
        return format!("no node fits {wanted}: the cell has no nodes");
    }
    let parts: Vec<String> = refusals.iter().map(|(r, n)| r.describe(*n)).collect();
    format!("no node fits {wanted}: {}", parts.join(", "))
}

#[cfg(test)]
mod tests;

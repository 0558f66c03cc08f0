//! The running set of tasks: admission (with preemption of lower priorities), starting,
//! exits from the one reaper, restarts with backoff, kills with a grace period,
//! cordon/drain, and an event for every transition.
//!
//! State sits behind one mutex held only for bookkeeping; spawning runs on a blocking
//! thread, timers on tokio.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::broadcast;

use super::logs::{Stream, TaskLog};
use super::seccomp::Profile;
use super::spawn::{Spawned, preflight, spawn_task};
use super::spec::{NodeLimits, RestartMode, SpecError, TaskSpec};
use super::state::{Lifecycle, Reason, TaskState, Transition};
use crate::cgroup::{CgroupRoot, TaskCgroup, Usage};

/// How a process ended, as the reaper saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Invalid(#[from] SpecError),
    #[error("task {0} already exists with a different spec")]
    AlreadyExists(String),
    #[error("node is {0}: it takes no new tasks")]
    NotAccepting(&'static str),
    #[error("{0}")]
    NoRoom(String),
    #[error("no task {0}")]
    NotFound(String),
}

/// A task as the API reports it.
#[derive(Debug, Clone)]
pub struct TaskView {
    pub id: String,
    pub job: String,
    pub state: TaskState,
    pub reason: Reason,
    pub exit_code: i32,
    pub signal: i32,
    pub message: String,
    pub pid: u32,
    pub restarts: u32,
    pub priority: i32,
    pub transitions: Vec<Transition>,
    pub usage: Usage,
    pub resources: super::spec::Resources,
    pub landlock_abi: u32,
    /// Finished and no restart coming.
    pub done: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Kill,
    Evict(Reason),
}

struct Task {
    spec: TaskSpec,
    life: Lifecycle,
    pid: Option<u32>,
    exit_code: i32,
    signal: i32,
    message: String,
    restarts: u32,
    cgroup: Option<Arc<TaskCgroup>>,
    oom_baseline: u64,
    log: TaskLog,
    stop: Option<Stop>,
    landlock_abi: u32,
    usage: Usage,
    /// Grows with every start; timers of an earlier run see a different value and do nothing.
    epoch: u64,
    restart_pending: bool,
}

impl Task {
    fn view(&self) -> TaskView {
        let usage = self
            .cgroup
            .as_ref()
            .map(|c| c.usage())
            .unwrap_or(self.usage);
        TaskView {
            id: self.spec.id.clone(),
            job: self.spec.job.clone(),
            state: self.life.state(),
            reason: self.life.reason(),
            exit_code: self.exit_code,
            signal: self.signal,
            message: self.message.clone(),
            pid: self.pid.unwrap_or(0),
            restarts: self.restarts,
            priority: self.spec.priority,
            transitions: self.life.transitions().to_vec(),
            usage,
            resources: self.spec.resources,
            landlock_abi: self.landlock_abi,
            done: self.life.is_finished() && !self.restart_pending,
        }
    }

    /// Holds node resources: everything not finished.
    fn holds_resources(&self) -> bool {
        !self.life.is_finished()
    }
}

#[derive(Default)]
struct Tasks {
    by_id: BTreeMap<String, Task>,
    by_pid: HashMap<u32, String>,
    /// Exits of pids not (yet) known: a child can die before its spawn is recorded.
    unclaimed: HashMap<u32, ExitStatus>,
    unclaimed_order: VecDeque<u32>,
    cordoned: bool,
    draining: bool,
}

const MAX_UNCLAIMED: usize = 4096;
/// Finished tasks kept for status and logs; older ones are forgotten (and their log file
/// removed) so a node running short tasks forever does not grow forever.
pub const MAX_FINISHED: usize = 256;

/// Options of the supervisor that come from the node's config.
pub struct SupervisorConfig {
    pub allocatable: NodeLimits,
    pub log_dir: Option<PathBuf>,
    pub cgroups: CgroupRoot,
    pub seccomp: Profile,
}

struct Shared {
    tasks: Mutex<Tasks>,
    events: broadcast::Sender<(u64, TaskView)>,
    generation: Arc<AtomicU64>,
    config: SupervisorConfig,
}

/// Cheap to clone; every clone drives the same tasks.
#[derive(Clone)]
pub struct Supervisor {
    shared: Arc<Shared>,
}

impl Supervisor {
    /// `generation` is the node's change counter, bumped on every transition.
    pub fn new(config: SupervisorConfig, generation: Arc<AtomicU64>) -> Self {
        let (events, _) = broadcast::channel(4096);
        Self {
            shared: Arc::new(Shared {
                tasks: Mutex::new(Tasks::default()),
                events,
                generation,
                config,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Tasks> {
        // A poisoned lock means a panic mid-update elsewhere; the data is still the best
        // we have and PID 1 must go on.
        self.shared
            .tasks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn allocatable(&self) -> NodeLimits {
        self.shared.config.allocatable
    }

    /// Drops celld's parent cgroup once no task needs it (shutdown).
    pub fn release_cgroups(&self) {
        self.shared.config.cgroups.remove_base();
    }

    pub fn cgroup_version(&self) -> &'static str {
        self.shared.config.cgroups.version()
    }

    fn changed(&self, task: &Task) {
        let generation = self.shared.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let _ = self.shared.events.send((generation, task.view()));
    }

    pub fn bump_generation(&self) {
        self.shared.generation.fetch_add(1, Ordering::SeqCst);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<(u64, TaskView)> {
        self.shared.events.subscribe()
    }

    fn transition(&self, task: &mut Task, state: TaskState, reason: Reason, msg: &str) {
        if let Err(e) = task.life.to(state, reason, msg) {
            tracing::error!(task_id = %task.spec.id, error = %e, "lifecycle bug");
            return;
        }
        tracing::info!(task_id = %task.spec.id, state = ?state, reason = ?reason, message = msg, "task transition");
        self.changed(task);
    }

    /// Admits and starts a task. Idempotent by id.
    pub fn run_task(&self, spec: TaskSpec) -> Result<(TaskView, bool), RunError> {
        spec.validate(&self.shared.config.allocatable)?;
        preflight(&spec)?;
        let mut tasks = self.lock();
        if let Some(existing) = tasks.by_id.get(&spec.id) {
            return if existing.spec == spec {
                Ok((existing.view(), false))
            } else {
                Err(RunError::AlreadyExists(spec.id))
            };
        }
        if tasks.draining {
            return Err(RunError::NotAccepting("draining"));
        }
        if tasks.cordoned {
            return Err(RunError::NotAccepting("cordoned"));
        }
        let victims = self.choose_victims(&tasks, &spec)?;
        for v in victims {
            if let Some(t) = tasks.by_id.get_mut(&v) {
                tracing::info!(task_id = %v, for_task = %spec.id, "preempting");
                self.stop_locked(t, Stop::Evict(Reason::Preempted), None);
            }
        }
        let log_file = self
            .shared
            .config
            .log_dir
            .as_ref()
            .map(|d| d.join(format!("{}.log", spec.id)));
        let id = spec.id.clone();
        let task = Task {
            spec,
            life: Lifecycle::new(),
            pid: None,
            exit_code: -1,
            signal: 0,
            message: String::new(),
            restarts: 0,
            cgroup: None,
            oom_baseline: 0,
            log: TaskLog::new(log_file),
            stop: None,
            landlock_abi: 0,
            usage: Usage::default(),
            epoch: 0,
            restart_pending: false,
        };
        self.changed(&task);
        let view = task.view();
        forget_oldest_finished(&mut tasks);
        tasks.by_id.insert(id.clone(), task);
        drop(tasks);
        self.start(id);
        Ok((view, true))
    }

    /// Lower-priority tasks to evict so `spec` fits in memory and CPU, lowest priority
    /// first; an error when even all of them would not make room.
    fn choose_victims(&self, tasks: &Tasks, spec: &TaskSpec) -> Result<Vec<String>, RunError> {
        let limits = self.shared.config.allocatable;
        let held = |f: fn(&TaskSpec) -> u64| -> u64 {
            tasks
                .by_id
                .values()
                .filter(|t| t.holds_resources())
                .map(|t| f(&t.spec))
                .sum()
        };
        let mut mem = held(|s| s.resources.memory_bytes) + spec.resources.memory_bytes;
        let mut cpu = held(|s| s.resources.cpu_millis) + spec.resources.cpu_millis;
        let fits = |mem: u64, cpu: u64| mem <= limits.memory_bytes && cpu <= limits.cpu_millis;
        if fits(mem, cpu) {
            return Ok(Vec::new());
        }
        let mut candidates: Vec<&Task> = tasks
            .by_id
            .values()
            .filter(|t| t.holds_resources() && t.spec.priority < spec.priority && t.stop.is_none())
            .collect();
        candidates.sort_by_key(|t| t.spec.priority);
        let mut victims = Vec::new();
        for t in candidates {
            if fits(mem, cpu) {
                break;
            }
            mem -= t.spec.resources.memory_bytes;
            cpu -= t.spec.resources.cpu_millis;
            victims.push(t.spec.id.clone());
        }
        if fits(mem, cpu) {
            Ok(victims)
        } else {
            Err(RunError::NoRoom(format!(
                "resources: {} bytes and {} cpu millis do not fit: allocatable is {} bytes, \
                 {} millis, and lower-priority tasks do not hold enough to preempt",
                spec.resources.memory_bytes,
                spec.resources.cpu_millis,
                limits.memory_bytes,
                limits.cpu_millis
            )))
        }
    }

    fn start(&self, id: String) {
        let (spec, epoch) = {
            let mut tasks = self.lock();
            let Some(t) = tasks.by_id.get_mut(&id) else {
                return;
            };
            if t.life.state() != TaskState::Pending || t.stop.is_some() {
                return;
            }
            t.epoch += 1;
            self.transition(t, TaskState::Starting, Reason::None, "");
            (t.spec.clone(), t.epoch)
        };
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let cfg = &this.shared.config;
            let result = spawn_task(&spec, &cfg.cgroups, &cfg.seccomp);
            this.started(&spec.id, epoch, result);
        });
    }

    fn started(&self, id: &str, epoch: u64, result: Result<Spawned, super::spawn::SpawnError>) {
        let mut tasks = self.lock();
        let Tasks {
            by_id,
            by_pid,
            unclaimed,
            ..
        } = &mut *tasks;
        let Some(t) = by_id.get_mut(id) else {
            return;
        };
        if t.epoch != epoch {
            return;
        }
        match result {
            Err(e) => {
                if let Some(pid) = e.pid {
                    // The helper exits by itself; its status is of no interest.
                    if unclaimed.remove(&pid).is_none() {
                        by_pid.insert(pid, String::new());
                    }
                }
                t.message = e.to_string();
                t.exit_code = -1;
                t.signal = 0;
                let msg = t.message.clone();
                tracing::warn!(task_id = %id, error = %msg, "task failed to start");
                self.transition(t, TaskState::Dead, Reason::FailedToStart, &msg);
                self.after_death(t);
            }
            Ok(spawned) => {
                let cgroup = Arc::new(spawned.cgroup);
                t.oom_baseline = cgroup.oom_kills();
                t.cgroup = Some(cgroup);
                t.pid = Some(spawned.pid);
                t.landlock_abi = spawned.landlock_abi;
                t.message.clear();
                self.pump_logs(&t.log, spawned.stdout, spawned.stderr);
                self.transition(t, TaskState::Running, Reason::None, "");
                if let Some(status) = unclaimed.remove(&spawned.pid) {
                    self.exited_locked(t, status);
                    return;
                }
                by_pid.insert(spawned.pid, id.to_string());
                if let Some(stop) = t.stop {
                    // A kill arrived while it was starting.
                    t.stop = None;
                    self.stop_locked(t, stop, None);
                }
            }
        }
    }

    fn pump_logs(&self, log: &TaskLog, out: std::os::fd::OwnedFd, err: std::os::fd::OwnedFd) {
        for (fd, stream) in [(out, Stream::Stdout), (err, Stream::Stderr)] {
            match tokio::net::unix::pipe::Receiver::from_owned_fd(fd) {
                Ok(rx) => {
                    tokio::spawn(log.clone().pump(stream, rx));
                }
                Err(e) => tracing::warn!(error = %e, "cannot read task output"),
            }
        }
    }

    /// Called by the reaper for every child that ended.
    pub fn on_exit(&self, pid: u32, status: ExitStatus) {
        let mut tasks = self.lock();
        match tasks.by_pid.remove(&pid) {
            Some(id) if id.is_empty() => {}
            Some(id) => {
                if let Some(t) = tasks.by_id.get_mut(&id) {
                    self.exited_locked(t, status);
                }
            }
            None => {
                tasks.unclaimed.insert(pid, status);
                tasks.unclaimed_order.push_back(pid);
                while tasks.unclaimed_order.len() > MAX_UNCLAIMED {
                    if let Some(old) = tasks.unclaimed_order.pop_front() {
                        tasks.unclaimed.remove(&old);
                    }
                }
            }
        }
    }

    fn exited_locked(&self, t: &mut Task, status: ExitStatus) {
        let oom = t
            .cgroup
            .as_ref()
            .map(|c| c.oom_kills() > t.oom_baseline)
            .unwrap_or(false);
        match status {
            ExitStatus::Code(c) => {
                t.exit_code = c;
                t.signal = 0;
            }
            ExitStatus::Signal(s) => {
                t.exit_code = -1;
                t.signal = s;
            }
        }
        t.pid = None;
        let (state, reason) = match t.stop {
            Some(Stop::Evict(r)) => (TaskState::Evicted, r),
            _ if oom => (TaskState::Dead, Reason::OomKilled),
            Some(Stop::Kill) => (TaskState::Dead, Reason::Killed),
            None => (TaskState::Dead, Reason::Exited),
        };
        let msg = match status {
            ExitStatus::Code(c) => format!("exit code {c}"),
            ExitStatus::Signal(s) => format!("killed by signal {s}"),
        };
        self.transition(t, state, reason, &msg);
        self.after_death(t);
    }

    /// Cleans up a run and schedules a restart when the policy asks for one.
    fn after_death(&self, t: &mut Task) {
        if let Some(cg) = t.cgroup.take() {
            t.usage = cg.usage();
            // Anything the task's init left behind dies with it.
            cg.kill_all();
            tokio::spawn(async move {
                for _ in 0..50 {
                    if cg.delete() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                tracing::warn!(cgroup = cg.path(), "cgroup still busy; left in place");
            });
        }
        if t.life.state() != TaskState::Dead || t.stop.is_some() {
            return;
        }
        let failed = t.exit_code != 0 || t.life.reason() != Reason::Exited;
        let policy = &t.spec.restart;
        let wanted = match policy.mode {
            RestartMode::Never => false,
            RestartMode::OnFailure => failed,
            RestartMode::Always => true,
        };
        if !wanted || (policy.max_restarts != 0 && t.restarts >= policy.max_restarts) {
            return;
        }
        let delay = policy.backoff(t.restarts);
        t.restart_pending = true;
        let id = t.spec.id.clone();
        let epoch = t.epoch;
        let this = self.clone();
        tracing::info!(task_id = %id, delay_ms = delay.as_millis() as u64, "restart scheduled");
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            {
                let mut tasks = this.lock();
                let draining = tasks.draining;
                let Some(t) = tasks.by_id.get_mut(&id) else {
                    return;
                };
                t.restart_pending = false;
                if draining
                    || t.epoch != epoch
                    || t.life.state() != TaskState::Dead
                    || t.stop.is_some()
                {
                    return;
                }
                t.restarts += 1;
                this.transition(t, TaskState::Pending, Reason::None, "restart");
            }
            this.start(id);
        });
    }

    /// SIGTERM now, SIGKILL when the grace period is over (the whole cgroup).
    fn stop_locked(&self, t: &mut Task, stop: Stop, grace: Option<Duration>) {
        match t.life.state() {
            TaskState::Pending => {
                t.stop = Some(stop);
                let (state, reason) = match stop {
                    Stop::Kill => (TaskState::Dead, Reason::Killed),
                    Stop::Evict(r) => (TaskState::Evicted, r),
                };
                self.transition(t, state, reason, "stopped before it started");
            }
            TaskState::Starting => t.stop = Some(stop),
            TaskState::Running => {
                t.stop = Some(stop);
                let Some(pid) = t.pid else { return };
                let grace = grace.unwrap_or(t.spec.kill_grace);
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
                let cgroup = t.cgroup.clone();
                let epoch = t.epoch;
                let id = t.spec.id.clone();
                let this = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(grace).await;
                    let tasks = this.lock();
                    let still = tasks
                        .by_id
                        .get(&id)
                        .is_some_and(|t| t.epoch == epoch && t.life.state() == TaskState::Running);
                    drop(tasks);
                    if still {
                        tracing::info!(task_id = %id, "grace period over: SIGKILL");
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid as i32),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                        if let Some(cg) = cgroup {
                            cg.kill_all();
                        }
                    }
                });
            }
            // Finished: only a pending restart can be called off.
            TaskState::Dead | TaskState::Evicted => {
                t.stop = Some(stop);
                if t.restart_pending {
                    t.restart_pending = false;
                    self.changed(t);
                }
            }
        }
    }

    pub fn kill_task(&self, id: &str, grace: Option<Duration>) -> Result<TaskView, RunError> {
        let mut tasks = self.lock();
        let t = tasks
            .by_id
            .get_mut(id)
            .ok_or_else(|| RunError::NotFound(id.to_string()))?;
        self.stop_locked(t, Stop::Kill, grace);
        Ok(t.view())
    }

    /// Evicts one task with `reason` (it goes back to the master to be placed again).
    pub fn evict(&self, id: &str, reason: Reason, grace: Option<Duration>) -> bool {
        let mut tasks = self.lock();
        match tasks.by_id.get_mut(id) {
            Some(t) if !t.life.is_finished() => {
                self.stop_locked(t, Stop::Evict(reason), grace);
                true
            }
            _ => false,
        }
    }

    pub fn set_cordoned(&self, on: bool) {
        let mut tasks = self.lock();
        tasks.cordoned = on;
        if !on {
            tasks.draining = false;
        }
        drop(tasks);
        self.bump_generation();
    }

    /// Cordons the node and evicts every live task with NODE_DRAIN.
    pub fn drain(&self, grace: Option<Duration>) -> Vec<String> {
        let mut tasks = self.lock();
        tasks.cordoned = true;
        tasks.draining = true;
        let mut evicted = Vec::new();
        let ids: Vec<String> = tasks.by_id.keys().cloned().collect();
        for id in ids {
            if let Some(t) = tasks.by_id.get_mut(&id)
                && !t.life.is_finished()
            {
                self.stop_locked(t, Stop::Evict(Reason::NodeDrain), grace);
                evicted.push(id);
            }
        }
        drop(tasks);
        self.bump_generation();
        evicted
    }

    pub fn cordon_state(&self) -> (bool, bool) {
        let tasks = self.lock();
        (tasks.cordoned, tasks.draining)
    }

    pub fn list(&self, job: &str) -> Vec<TaskView> {
        let tasks = self.lock();
        tasks
            .by_id
            .values()
            .filter(|t| job.is_empty() || t.spec.job == job)
            .map(Task::view)
            .collect()
    }

    pub fn get(&self, id: &str) -> Option<TaskView> {
        self.lock().by_id.get(id).map(Task::view)
    }

    pub fn log(&self, id: &str) -> Option<TaskLog> {
        self.lock().by_id.get(id).map(|t| t.log.clone())
    }

    /// True while any task still has a process (for shutdown).
    pub fn any_running(&self) -> bool {
        self.lock()
            .by_id
            .values()
            .any(|t| matches!(t.life.state(), TaskState::Running | TaskState::Starting))
    }
}

/// Drops the oldest finished tasks beyond `MAX_FINISHED`.
fn forget_oldest_finished(tasks: &mut Tasks) {
    let mut finished: Vec<(i64, String)> = tasks
        .by_id
        .values()
        .filter(|t| t.life.is_finished() && !t.restart_pending)
        .map(|t| {
            let at = t.life.transitions().last().map(|x| x.at_unix_ms);
            (at.unwrap_or(0), t.spec.id.clone())
        })
        .collect();
    if finished.len() < MAX_FINISHED {
        return;
    }
    finished.sort();
    let excess = finished.len() + 1 - MAX_FINISHED;
    for (_, id) in finished.into_iter().take(excess) {
        if let Some(t) = tasks.by_id.remove(&id)
            && let Some(path) = t.log.path()
        {
            let _ = std::fs::remove_file(path);
        }
    }
}

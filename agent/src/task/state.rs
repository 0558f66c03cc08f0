//! The Borg task lifecycle: PENDING -> STARTING -> RUNNING -> DEAD | EVICTED, with a
//! reason and a timestamp on every transition. Pure state, no I/O.

use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskState {
    Pending,
    Starting,
    Running,
    Dead,
    Evicted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    None,
    Exited,
    Killed,
    OomKilled,
    FailedToStart,
    NodeDrain,
    Preempted,
    MemoryPressure,
    NodeShutdown,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub state: TaskState,
    pub reason: Reason,
    pub at_unix_ms: i64,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a task cannot go from {from:?} to {to:?}")]
pub struct IllegalTransition {
    pub from: TaskState,
    pub to: TaskState,
}

/// How many transitions a task keeps; a task restarting forever must not grow without end.
const MAX_TRANSITIONS: usize = 64;

#[derive(Debug, Clone)]
pub struct Lifecycle {
    state: TaskState,
    reason: Reason,
    transitions: Vec<Transition>,
}

pub fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Lifecycle {
    pub fn new() -> Self {
        Self {
            state: TaskState::Pending,
            reason: Reason::None,
            transitions: vec![Transition {
                state: TaskState::Pending,
                reason: Reason::None,
                at_unix_ms: now_unix_ms(),
                message: String::new(),
            }],
        }
    }

    pub fn state(&self) -> TaskState {
        self.state
    }

    pub fn reason(&self) -> Reason {
        self.reason
    }

    pub fn transitions(&self) -> &[Transition] {
        &self.transitions
    }

    /// True once the task will not run again by itself.
    pub fn is_finished(&self) -> bool {
        matches!(self.state, TaskState::Dead | TaskState::Evicted)
    }

    fn allowed(from: TaskState, to: TaskState) -> bool {
        use TaskState::*;
        matches!(
            (from, to),
            (Pending, Starting)
                | (Pending, Dead)
                | (Pending, Evicted)
                | (Starting, Running)
                | (Starting, Dead)
                | (Starting, Evicted)
                | (Running, Dead)
                | (Running, Evicted)
                // A restart: the same task goes round again.
                | (Dead, Pending)
        )
    }

    pub fn to(
        &mut self,
        state: TaskState,
        reason: Reason,
        message: impl Into<String>,
    ) -> Result<(), IllegalTransition> {
        if !Self::allowed(self.state, state) {
            return Err(IllegalTransition {
                from: self.state,
                to: state,
            });
        }
        self.state = state;
        self.reason = reason;
        if self.transitions.len() >= MAX_TRANSITIONS {
            // Keep the first (creation) and drop the oldest after it.
            self.transitions.remove(1);
        }
        self.transitions.push(Transition {
            state,
            reason,
            at_unix_ms: now_unix_ms(),
            message: message.into(),
        });
        Ok(())
    }
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_runs_and_dies_with_timestamps() {
        let mut l = Lifecycle::new();
        l.to(TaskState::Starting, Reason::None, "").unwrap();
        l.to(TaskState::Running, Reason::None, "").unwrap();
        l.to(TaskState::Dead, Reason::Exited, "exit 0").unwrap();
        let states: Vec<_> = l.transitions().iter().map(|t| t.state).collect();
        assert_eq!(
            states,
            [
                TaskState::Pending,
                TaskState::Starting,
                TaskState::Running,
                TaskState::Dead
            ]
        );
        assert!(l.transitions().iter().all(|t| t.at_unix_ms > 0));
        assert!(l.is_finished());
    }

    #[test]
    fn evicted_is_final_and_running_cannot_go_back_to_starting() {
        let mut l = Lifecycle::new();
        l.to(TaskState::Starting, Reason::None, "").unwrap();
        l.to(TaskState::Running, Reason::None, "").unwrap();
        assert!(l.to(TaskState::Starting, Reason::None, "").is_err());
        l.to(TaskState::Evicted, Reason::NodeDrain, "").unwrap();
        assert!(l.to(TaskState::Pending, Reason::None, "").is_err());
        assert_eq!(l.reason(), Reason::NodeDrain);
    }

    #[test]
    fn restarting_forever_keeps_a_bounded_history() {
        let mut l = Lifecycle::new();
        for _ in 0..1000 {
            l.to(TaskState::Starting, Reason::None, "").unwrap();
            l.to(TaskState::Running, Reason::None, "").unwrap();
            l.to(TaskState::Dead, Reason::Exited, "").unwrap();
            l.to(TaskState::Pending, Reason::None, "").unwrap();
        }
        assert!(l.transitions().len() <= MAX_TRANSITIONS);
        assert_eq!(l.transitions()[0].state, TaskState::Pending);
    }
}

//! A rollout as data, and its state machine, pure: the rollout and what the master sees
//! of each node in, the next actions out. The engine ([`super::engine`]) carries them out
//! and writes the rollout back, so a restarted master resumes where the store says.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RolloutState {
    Running,
    Paused,
    Done,
    Failed,
    Aborted,
}

impl RolloutState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Done => "done",
            Self::Failed => "failed",
            Self::Aborted => "aborted",
        }
    }

    /// Running or paused: another rollout may not start.
    pub fn is_active(self) -> bool {
        matches!(self, Self::Running | Self::Paused)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Queued,
    /// Cordoned; its tasks are being moved.
    Draining,
    /// Asked to reimage (or about to be).
    Reimaging,
    /// Reimage accepted; waiting for the new boot to register and be Ready.
    Booting,
    Done,
    Failed,
    /// Failed, and sent back to the version it ran.
    RolledBack,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Draining => "draining",
            Self::Reimaging => "reimaging",
            Self::Booting => "booting",
            Self::Done => "done",
            Self::Failed => "failed",
            Self::RolledBack => "rolled-back",
        }
    }

    /// Out of service because of the rollout.
    pub fn in_progress(self) -> bool {
        matches!(self, Self::Draining | Self::Reimaging | Self::Booting)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutNode {
    pub node: String,
    pub from_version: String,
    pub from_boot_id: String,
    pub phase: Phase,
    /// Unix ms the phase began.
    pub since_ms: u64,
    pub message: String,
    /// Tasks its drain evicted, and their copies on the node still stopping.
    #[serde(default)]
    pub evicted: Vec<String>,
    #[serde(default)]
    pub stopping: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    pub id: u64,
    pub to_version: String,
    pub selector: String,
    pub max_unavailable: u32,
    pub drain_timeout_ms: u64,
    pub ready_timeout_ms: u64,
    pub state: RolloutState,
    pub message: String,
    pub nodes: Vec<RolloutNode>,
    pub created_ms: u64,
}

/// What the master sees of a node now.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeNow {
    pub ready: bool,
    pub boot_id: String,
    pub image_version: String,
}

impl Rollout {
    pub fn in_progress(&self) -> usize {
        self.nodes.iter().filter(|n| n.phase.in_progress()).count()
    }

    /// Queued nodes to start now (cordon and drain), keeping at most `max_unavailable`
    /// out of service. None while paused or over.
    pub fn to_start(&self) -> Vec<usize> {
        if self.state != RolloutState::Running {
            return Vec::new();
        }
        let room = (self.max_unavailable as usize).saturating_sub(self.in_progress());
        self.nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.phase == Phase::Queued)
            .map(|(i, _)| i)
            .take(room)
            .collect()
    }

    /// Whether a booting node is back on the new version, or out of time.
    pub fn boot_outcome(&self, i: usize, now: &NodeNow, now_ms: u64) -> Option<Result<(), String>> {
        let n = &self.nodes[i];
        let back = now.ready && now.boot_id != n.from_boot_id && !now.boot_id.is_empty();
        if back && now.image_version == self.to_version {
            return Some(Ok(()));
        }
        if back {
            return Some(Err(format!(
                "came back on {} instead of {}",
                dash(&now.image_version),
                self.to_version
            )));
        }
        (now_ms.saturating_sub(n.since_ms) > self.ready_timeout_ms).then(|| {
            Err(format!(
                "not back on {} within {} s",
                self.to_version,
                self.ready_timeout_ms / 1000
            ))
        })
    }

    /// Every node done: the rollout is.
    pub fn finished(&self) -> bool {
        self.nodes.iter().all(|n| n.phase == Phase::Done)
    }

    /// Moves node `i` to `phase` and stops the rollout on a failure.
    pub fn set_phase(&mut self, i: usize, phase: Phase, message: String, now_ms: u64) {
        let n = &mut self.nodes[i];
        n.phase = phase;
        n.since_ms = now_ms;
        n.message = message.clone();
        if matches!(phase, Phase::Failed | Phase::RolledBack) && self.state.is_active() {
            self.state = RolloutState::Failed;
            self.message = format!("stopped at {}: {message}", n.node);
        }
        if self.finished() && self.state.is_active() {
            self.state = RolloutState::Done;
            self.message = format!("{} node(s) on {}", self.nodes.len(), self.to_version);
        }
    }
}

fn dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rollout(nodes: &[&str], max_unavailable: u32) -> Rollout {
        Rollout {
            id: 1,
            to_version: "v2".into(),
            selector: String::new(),
            max_unavailable,
            drain_timeout_ms: 60_000,
            ready_timeout_ms: 60_000,
            state: RolloutState::Running,
            message: String::new(),
            nodes: nodes
                .iter()
                .map(|n| RolloutNode {
                    node: n.to_string(),
                    from_version: "v1".into(),
                    from_boot_id: format!("boot-{n}"),
                    phase: Phase::Queued,
                    since_ms: 0,
                    message: String::new(),
                    evicted: Vec::new(),
                    stopping: Vec::new(),
                })
                .collect(),
            created_ms: 0,
        }
    }

    #[test]
    fn batches_keep_within_max_unavailable() {
        let mut r = rollout(&["a", "b", "c"], 1);
        assert_eq!(r.to_start(), [0]);
        r.set_phase(0, Phase::Draining, String::new(), 1);
        assert!(r.to_start().is_empty());
        r.set_phase(0, Phase::Done, String::new(), 2);
        assert_eq!(r.to_start(), [1]);
        let mut wide = rollout(&["a", "b", "c"], 2);
        assert_eq!(wide.to_start(), [0, 1]);
        wide.state = RolloutState::Paused;
        assert!(wide.to_start().is_empty());
    }

    #[test]
    fn a_node_is_back_only_with_a_new_boot_on_the_new_version() {
        let mut r = rollout(&["a"], 1);
        r.set_phase(0, Phase::Booting, String::new(), 1_000);
        let same_boot = NodeNow {
            ready: true,
            boot_id: "boot-a".into(),
            image_version: "v1".into(),
        };
        assert_eq!(r.boot_outcome(0, &same_boot, 2_000), None);
        let back = NodeNow {
            ready: true,
            boot_id: "boot-a2".into(),
            image_version: "v2".into(),
        };
        assert_eq!(r.boot_outcome(0, &back, 2_000), Some(Ok(())));
        let wrong = NodeNow {
            image_version: "v1".into(),
            ..back.clone()
        };
        assert!(r.boot_outcome(0, &wrong, 2_000).unwrap().is_err());
        let gone = NodeNow::default();
        assert_eq!(r.boot_outcome(0, &gone, 30_000), None);
        let late = r.boot_outcome(0, &gone, 62_000).unwrap().unwrap_err();
        assert!(late.contains("within 60 s"), "{late}");
    }

    #[test]
    fn a_failure_stops_the_rollout_and_the_last_node_finishes_it() {
        let mut r = rollout(&["a", "b"], 1);
        r.set_phase(0, Phase::Done, String::new(), 1);
        r.set_phase(1, Phase::Failed, "refused: bad signature".into(), 2);
        assert_eq!(r.state, RolloutState::Failed);
        assert!(r.message.contains("stopped at b: refused"), "{}", r.message);
        assert!(r.to_start().is_empty());
        let mut ok = rollout(&["a"], 1);
        ok.set_phase(0, Phase::Done, String::new(), 1);
        assert_eq!(ok.state, RolloutState::Done);
    }
}

//! Polling the fleet (Borg's link shards, in one process): every node's `GetStatus` once
//! an interval, each node at its own offset so the polls of a large fleet spread over
//! the interval, with a bound on calls in flight. A node that has the master's
//! generation answers "unchanged" and nothing is decoded or reported. Missed polls turn
//! a node Unknown, then Down; a reply brings it back.
//!
//! What this must not do: decide anything about tasks (the consumer of `Change`s does),
//! or let one slow node delay another's poll.
//!
//! Layout:
//! - this file: a node's health as the poller sees it, and the `StatusSource` trait, so
//!   tests and the benchmark use fakes.
//! - `schedule`: the `Poller`, one small task per node on a fixed schedule.
//! - `grpc`: `GrpcSource`, `GetStatus` over one HTTP/2 connection per node.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use celld_proto::v1 as pb;
use tokio::time::Instant;

mod grpc;
mod lite;
mod schedule;

pub use grpc::GrpcSource;
pub use schedule::Poller;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// Registered or listed, not polled yet.
    New,
    Ready,
    Unknown,
    Down,
}

/// What a poll changed about a node, for whoever reconciles (scheduler, CLI, store).
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// First reply, or back after Unknown/Down.
    Ready,
    Unknown,
    /// Its tasks are to be marked LOST and placed again.
    Down,
    /// A reply with a new generation (tasks or conditions moved).
    Status(Box<pb::NodeStatus>),
}

#[derive(Debug, Clone)]
pub struct PollPolicy {
    pub interval: Duration,
    /// Consecutive missed polls before Unknown, then before Down.
    pub unknown_after: u32,
    pub down_after: u32,
    /// Per call: past it, the poll is a miss. At most half the interval, so a node that
    /// missed can be asked again a timeout early and its next miss still falls on its
    /// slot (see `schedule`).
    pub timeout: Duration,
    pub max_in_flight: usize,
}

impl Default for PollPolicy {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(2),
            unknown_after: 1,
            down_after: 3,
            timeout: Duration::from_millis(800),
            max_in_flight: 256,
        }
    }
}

/// One node as the poller sees it.
#[derive(Debug, Clone)]
pub struct NodeHealth {
    pub address: String,
    pub liveness: Liveness,
    pub missed: u32,
    pub generation: u64,
    pub last_reply: Option<Instant>,
}

impl NodeHealth {
    pub fn new(address: String) -> Self {
        Self {
            address,
            liveness: Liveness::New,
            missed: 0,
            generation: 0,
            last_reply: None,
        }
    }

    /// A reply arrived. `None` generation: the node said "unchanged".
    pub fn on_reply(&mut self, status: Option<pb::NodeStatus>, now: Instant) -> Vec<Change> {
        let mut changes = Vec::new();
        self.missed = 0;
        self.last_reply = Some(now);
        if self.liveness != Liveness::Ready {
            self.liveness = Liveness::Ready;
            changes.push(Change::Ready);
        }
        if let Some(s) = status
            && s.generation != self.generation
        {
            self.generation = s.generation;
            changes.push(Change::Status(Box::new(s)));
        }
        changes
    }

    /// A poll failed or timed out.
    pub fn on_miss(&mut self, policy: &PollPolicy) -> Vec<Change> {
        self.missed = self.missed.saturating_add(1);
        let next = if self.missed >= policy.down_after {
            Liveness::Down
        } else if self.missed >= policy.unknown_after {
            Liveness::Unknown
        } else {
            self.liveness
        };
        if next == self.liveness {
            return Vec::new();
        }
        self.liveness = next;
        // A node that comes back after Down is a new generation of facts.
        if next == Liveness::Down {
            self.generation = 0;
        }
        match next {
            Liveness::Down => vec![Change::Down],
            Liveness::Unknown => vec![Change::Unknown],
            _ => Vec::new(),
        }
    }
}

/// Where statuses come from.
pub trait StatusSource: Send + Sync + 'static {
    /// `known` is the generation the master has; a node may answer "unchanged".
    fn get_status(
        &self,
        node: &str,
        address: &str,
        known: u64,
    ) -> impl Future<Output = Result<pb::NodeStatus, String>> + Send;

    /// The poller no longer asks `address` (node removed, or re-registered elsewhere):
    /// whatever is held for it can go.
    fn forget(&self, _address: &str) {}
}

/// The fleet's liveness, shared with whoever reads it.
pub type Fleet = Arc<Mutex<BTreeMap<String, NodeHealth>>>;

//! The `Poller`: one small task per node, each asking its node once an interval at its
//! own slot, so a fleet's polls spread over the interval and a slow or hung node holds
//! nothing but its own task. A look at the fleet once an interval starts tasks for new
//! nodes; a task ends by itself when its node leaves the fleet.
//!
//! When a miss is counted: a poll starts at the node's slot and is a miss when it has no
//! answer a timeout later. After a miss the node is asked a timeout *before* its next
//! slot, so the next miss is counted on the slot itself. A node that goes quiet just
//! after answering is then Down at most `down_after - 1` intervals after its first
//! missed slot, which is less than `down_after` intervals after it went quiet; counting
//! every miss a timeout after its slot would add that timeout (up to 3.8 intervals with
//! the defaults, as measured before this schedule).

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};

use celld_proto::v1 as pb;
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;

use super::{Change, Fleet, PollPolicy, StatusSource};

pub struct Poller<S> {
    shared: Arc<Shared<S>>,
}

impl<S> Clone for Poller<S> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

struct Shared<S> {
    source: S,
    policy: PollPolicy,
    fleet: Fleet,
    changes: mpsc::UnboundedSender<(String, Change)>,
    /// Bounds the calls out at once, across all nodes.
    gate: Semaphore,
    /// Ids of the nodes that have a poll task. Locked after `fleet` when both are held.
    polled: Mutex<HashSet<String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<S: StatusSource> Poller<S> {
    pub fn new(
        source: S,
        policy: PollPolicy,
        fleet: Fleet,
    ) -> (Self, mpsc::UnboundedReceiver<(String, Change)>) {
        let (changes, rx) = mpsc::unbounded_channel();
        let shared = Shared {
            source,
            gate: Semaphore::new(policy.max_in_flight.max(1)),
            policy,
            fleet,
            changes,
            polled: Mutex::default(),
        };
        let poller = Self {
            shared: Arc::new(shared),
        };
        (poller, rx)
    }

    /// Polls forever: once an interval, nodes new to the fleet get a poll task.
    pub async fn run(self) {
        let mut tick = tokio::time::interval(self.shared.policy.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.start_new_nodes();
        }
    }

    /// Starts a poll task for every node of the fleet without one. Their first polls
    /// spread evenly over the next interval, so a fleet that registers at once (or a
    /// master that starts with a full fleet) does not poll in one burst.
    fn start_new_nodes(&self) -> usize {
        let mut new = Vec::new();
        {
            let fleet = lock(&self.shared.fleet);
            let mut polled = lock(&self.shared.polled);
            for id in fleet.keys() {
                if !polled.contains(id) {
                    polled.insert(id.clone());
                    new.push(id.clone());
                }
            }
        }
        let now = Instant::now();
        let count = new.len();
        for (i, id) in new.into_iter().enumerate() {
            let first = now + self.shared.policy.interval.mul_f64(i as f64 / count as f64);
            tokio::spawn(self.shared.clone().poll_node(id, first));
        }
        count
    }
}

impl<S: StatusSource> Shared<S> {
    /// One node's polls, until it leaves the fleet.
    async fn poll_node(self: Arc<Self>, id: String, first: Instant) {
        let interval = self.policy.interval;
        let mut slot = first;
        let mut missing = false;
        let mut asked: Option<String> = None;
        loop {
            let start = if missing {
                slot.checked_sub(self.policy.timeout).unwrap_or(slot)
            } else {
                slot
            };
            tokio::time::sleep_until(start).await;
            let Some((address, known)) = self.target(&id) else {
                if let Some(gone) = asked {
                    self.source.forget(&gone);
                }
                return;
            };
            if asked.as_deref() != Some(address.as_str())
                && let Some(moved) = asked.replace(address.clone())
            {
                // Re-registered at a new address: the old one is not asked again.
                self.source.forget(&moved);
            }
            let result = {
                // The wait for a slot is the master's, not the node's: only the call is
                // timed.
                let _permit = self.gate.acquire().await.ok();
                tokio::time::timeout(
                    self.policy.timeout,
                    self.source.get_status(&id, &address, known),
                )
                .await
                .map_err(drop)
            };
            missing = self.record(&id, result);
            // The next slot after now: an overloaded master skips slots rather than
            // bunching the polls it is late for.
            let now = Instant::now();
            slot += interval;
            while slot <= now {
                slot += interval;
            }
        }
    }

    /// The node's address and the generation the master has, or `None` when it has
    /// left the fleet (then its task is no longer counted as running).
    fn target(&self, id: &str) -> Option<(String, u64)> {
        let fleet = lock(&self.fleet);
        match fleet.get(id) {
            Some(h) => Some((h.address.clone(), h.generation)),
            None => {
                lock(&self.polled).remove(id);
                None
            }
        }
    }

    /// Records one node's answer (or its absence), reports what changed, and says
    /// whether the node is missing polls.
    fn record(&self, id: &str, result: Result<Result<pb::NodeStatus, String>, ()>) -> bool {
        let now = Instant::now();
        let (changes, missing) = {
            let mut fleet = lock(&self.fleet);
            let Some(health) = fleet.get_mut(id) else {
                return false;
            };
            let changes = match result {
                Ok(Ok(s)) if s.unchanged => health.on_reply(None, now),
                Ok(Ok(s)) => health.on_reply(Some(s), now),
                Ok(Err(error)) => {
                    tracing::debug!(node_id = id, %error, "poll failed");
                    health.on_miss(&self.policy)
                }
                Err(()) => health.on_miss(&self.policy),
            };
            (changes, health.missed > 0)
        };
        for c in changes {
            let _ = self.changes.send((id.to_string(), c));
        }
        missing
    }
}

#[cfg(test)]
#[path = "schedule_tests.rs"]
mod tests;

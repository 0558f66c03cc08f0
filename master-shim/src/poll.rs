//! Polling the fleet (Borg's link shards, in one process): every node's `GetStatus` at an
//! interval, jittered so the polls of a large fleet spread over the interval, with a
//! bound on calls in flight so one slow node cannot hold the others up. A reply whose
//! generation has not moved is not decoded again. Missed polls turn a node Unknown, then
//! Down; a reply brings it back.
//!
//! The source of statuses is a trait, so tests and the benchmark use fakes.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use celld_proto::v1 as pb;
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;

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
    /// Per call.
    pub timeout: Duration,
    pub max_in_flight: usize,
}

impl Default for PollPolicy {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(2),
            unknown_after: 1,
            down_after: 3,
            // Under interval minus spread: a call ends before the node's next turn.
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
        address: &str,
        known: u64,
    ) -> impl Future<Output = Result<pb::NodeStatus, String>> + Send;
}

/// Polls over gRPC, one lazily connected channel per node.
#[derive(Default)]
pub struct GrpcSource {
    channels: Mutex<BTreeMap<String, tonic::transport::Channel>>,
    pub timeout: Duration,
}

impl GrpcSource {
    pub fn new(timeout: Duration) -> Self {
        Self {
            channels: Mutex::new(BTreeMap::new()),
            timeout,
        }
    }

    fn channel(&self, address: &str) -> Result<tonic::transport::Channel, String> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = channels.get(address) {
            return Ok(c.clone());
        }
        let c = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| format!("node address {address:?}: {e}"))?
            .connect_timeout(self.timeout)
            .timeout(self.timeout)
            .connect_lazy();
        channels.insert(address.to_string(), c.clone());
        Ok(c)
    }
}

impl StatusSource for GrpcSource {
    async fn get_status(&self, address: &str, known: u64) -> Result<pb::NodeStatus, String> {
        let channel = self.channel(address)?;
        let mut client = celld_proto::v1::node_client::NodeClient::new(channel);
        client
            .get_status(pb::GetStatusRequest {
                if_generation_differs_from: known,
            })
            .await
            .map(|r| r.into_inner())
            .map_err(|s| format!("{}: {}", s.code(), s.message()))
    }
}

/// The fleet's liveness, shared with whoever reads it.
pub type Fleet = Arc<Mutex<BTreeMap<String, NodeHealth>>>;

pub struct Poller<S> {
    source: Arc<S>,
    policy: PollPolicy,
    fleet: Fleet,
    changes: mpsc::UnboundedSender<(String, Change)>,
    /// Shared by overlapping rounds: the bound is on calls, not on rounds.
    gate: Arc<Semaphore>,
    /// Nodes with a call out; a node is not asked again before it answers or times out.
    in_flight: Arc<Mutex<std::collections::BTreeSet<String>>>,
}

impl<S> Clone for Poller<S> {
    fn clone(&self) -> Self {
        Self {
            source: self.source.clone(),
            policy: self.policy.clone(),
            fleet: self.fleet.clone(),
            changes: self.changes.clone(),
            gate: self.gate.clone(),
            in_flight: self.in_flight.clone(),
        }
    }
}

impl<S: StatusSource> Poller<S> {
    pub fn new(
        source: S,
        policy: PollPolicy,
        fleet: Fleet,
    ) -> (Self, mpsc::UnboundedReceiver<(String, Change)>) {
        let (changes, rx) = mpsc::unbounded_channel();
        let poller = Self {
            source: Arc::new(source),
            gate: Arc::new(Semaphore::new(policy.max_in_flight.max(1))),
            policy,
            fleet,
            changes,
            in_flight: Arc::default(),
        };
        (poller, rx)
    }

    /// Records one node's answer (or its absence) and reports what changed.
    fn record(&self, id: &str, result: Result<Result<pb::NodeStatus, String>, ()>) {
        let now = Instant::now();
        let changes = {
            let mut fleet = self.fleet.lock().unwrap_or_else(|p| p.into_inner());
            let Some(health) = fleet.get_mut(id) else {
                return;
            };
            match result {
                Ok(Ok(s)) if s.unchanged => health.on_reply(None, now),
                Ok(Ok(s)) => health.on_reply(Some(s), now),
                Ok(Err(_)) | Err(()) => health.on_miss(&self.policy),
            }
        };
        for c in changes {
            let _ = self.changes.send((id.to_string(), c));
        }
    }

    /// One round: every node once, spread over `spread` (zero: all at once), at most
    /// `max_in_flight` calls at a time. Each answer is recorded the moment it arrives, so
    /// a slow node delays nobody else; this returns when every poll has ended.
    pub async fn poll_round(&self, spread: Duration) {
        let targets: Vec<(String, String, u64)> = {
            let fleet = self.fleet.lock().unwrap_or_else(|p| p.into_inner());
            fleet
                .iter()
                .map(|(id, h)| (id.clone(), h.address.clone(), h.generation))
                .collect()
        };
        let n = targets.len().max(1) as u32;
        let start = Instant::now();
        let mut handles = Vec::with_capacity(targets.len());
        for (i, (id, address, known)) in targets.into_iter().enumerate() {
            // Node i polls at its own offset in the round: a fleet's polls do not bunch.
            let at = start + spread / n * i as u32;
            let this = self.clone();
            handles.push(tokio::spawn(async move {
                tokio::time::sleep_until(at).await;
                {
                    let mut busy = this.in_flight.lock().unwrap_or_else(|p| p.into_inner());
                    if !busy.insert(id.clone()) {
                        return; // its last call is still out; that one will count
                    }
                }
                let result = {
                    let _permit = this.gate.clone().acquire_owned().await.ok();
                    tokio::time::timeout(
                        this.policy.timeout,
                        this.source.get_status(&address, known),
                    )
                    .await
                    .map_err(drop)
                };
                this.in_flight
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                this.record(&id, result);
            }));
        }
        for h in handles {
            let _ = h.await;
        }
    }

    /// Polls forever: a round starts every interval whether or not the last one has
    /// finished (a hung node holds only its own call).
    pub async fn run(self) {
        let mut tick = tokio::time::interval(self.policy.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let round = self.clone();
            let spread = self.policy.interval / 2;
            tokio::spawn(async move { round.poll_round(spread).await });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// Nodes that answer (with a generation) or are silent, by address.
    #[derive(Default)]
    struct FakeFleet {
        silent: Mutex<Vec<String>>,
        slow: Mutex<Vec<String>>,
        generation: AtomicU64,
    }

    impl StatusSource for FakeFleet {
        async fn get_status(&self, address: &str, known: u64) -> Result<pb::NodeStatus, String> {
            if self.silent.lock().unwrap().iter().any(|a| a == address) {
                return Err("connection refused".into());
            }
            if self.slow.lock().unwrap().iter().any(|a| a == address) {
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
            let generation = self.generation.load(Ordering::SeqCst);
            Ok(pb::NodeStatus {
                generation,
                unchanged: known == generation,
                ..Default::default()
            })
        }
    }

    fn fleet(n: usize) -> Fleet {
        Arc::new(Mutex::new(
            (0..n)
                .map(|i| (format!("n{i}"), NodeHealth::new(format!("10.0.0.{i}:7100"))))
                .collect(),
        ))
    }

    fn drain(rx: &mut mpsc::UnboundedReceiver<(String, Change)>) -> Vec<(String, Change)> {
        let mut out = Vec::new();
        while let Ok(c) = rx.try_recv() {
            out.push(c);
        }
        out
    }

    #[tokio::test(start_paused = true)]
    async fn silent_nodes_go_unknown_then_down_and_come_back() {
        let source = FakeFleet::default();
        source.generation.store(5, Ordering::SeqCst);
        source.silent.lock().unwrap().push("10.0.0.1:7100".into());
        let f = fleet(2);
        let (poller, mut rx) = Poller::new(source, PollPolicy::default(), f.clone());
        poller.poll_round(Duration::ZERO).await;
        let first = drain(&mut rx);
        assert!(first.contains(&("n0".into(), Change::Ready)));
        assert!(first.contains(&("n1".into(), Change::Unknown)));
        poller.poll_round(Duration::ZERO).await;
        assert!(drain(&mut rx).is_empty(), "second miss is still Unknown");
        poller.poll_round(Duration::ZERO).await;
        assert_eq!(drain(&mut rx), vec![("n1".into(), Change::Down)]);
        assert_eq!(f.lock().unwrap()["n1"].liveness, Liveness::Down);
        poller.source.silent.lock().unwrap().clear();
        poller.poll_round(Duration::ZERO).await;
        let back = drain(&mut rx);
        assert!(back.contains(&("n1".into(), Change::Ready)), "{back:?}");
        assert!(
            back.iter()
                .any(|(id, c)| id == "n1" && matches!(c, Change::Status(_)))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn unchanged_generations_are_not_reported_again() {
        let source = FakeFleet::default();
        source.generation.store(7, Ordering::SeqCst);
        let (poller, mut rx) = Poller::new(source, PollPolicy::default(), fleet(3));
        poller.poll_round(Duration::ZERO).await;
        assert_eq!(drain(&mut rx).len(), 6, "Ready + Status for each");
        poller.poll_round(Duration::ZERO).await;
        assert!(drain(&mut rx).is_empty());
        poller.source.generation.store(8, Ordering::SeqCst);
        poller.poll_round(Duration::ZERO).await;
        assert_eq!(drain(&mut rx).len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_node_costs_one_timeout_not_the_round() {
        let source = FakeFleet::default();
        source.slow.lock().unwrap().push("10.0.0.0:7100".into());
        let policy = PollPolicy {
            max_in_flight: 2,
            ..Default::default()
        };
        let (poller, mut rx) = Poller::new(source, policy, fleet(50));
        let start = Instant::now();
        poller.poll_round(Duration::ZERO).await;
        // One slot is held by the slow node for one timeout; the other serves the rest.
        assert!(
            start.elapsed() <= Duration::from_millis(1100),
            "{:?}",
            start.elapsed()
        );
        let changes = drain(&mut rx);
        assert!(changes.contains(&("n0".into(), Change::Unknown)));
        assert_eq!(
            changes.iter().filter(|(_, c)| *c == Change::Ready).count(),
            49
        );
    }
}

#[cfg(test)]
mod overlap_tests {
    use super::*;

    /// One node hangs for ever, the others answer at once.
    struct OneHung;

    impl StatusSource for OneHung {
        async fn get_status(&self, address: &str, _known: u64) -> Result<pb::NodeStatus, String> {
            if address == "hung" {
                std::future::pending::<()>().await;
            }
            Ok(pb::NodeStatus {
                generation: 1,
                ..Default::default()
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_node_does_not_slow_the_others_and_is_down_in_three_intervals() {
        let fleet: Fleet = Arc::new(Mutex::new(BTreeMap::from([
            ("a".to_string(), NodeHealth::new("a".into())),
            ("h".to_string(), NodeHealth::new("hung".into())),
        ])));
        let policy = PollPolicy::default();
        let interval = policy.interval;
        let (poller, mut rx) = Poller::new(OneHung, policy, fleet.clone());
        let started = Instant::now();
        tokio::spawn(poller.run());
        let mut a_replies = 0;
        let down_at = loop {
            let (id, c) = rx.recv().await.unwrap();
            if id == "a" && matches!(c, Change::Ready) {
                a_replies += 1;
            }
            if id == "h" && c == Change::Down {
                break started.elapsed();
            }
        };
        // First poll at t=0 times out at 0.8 s; polls 2 and 3 at 2 s and 4 s (+0.8).
        assert!(down_at <= interval * 3, "Down after {down_at:?}");
        assert_eq!(a_replies, 1, "a stays Ready without flapping");
        let a = fleet.lock().unwrap()["a"].clone();
        assert!(a.last_reply.unwrap() >= started + interval * 2);
    }
}

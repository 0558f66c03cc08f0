//! The measured side: the real `Poller` with the real `GrpcSource`, on a single-threaded
//! runtime pinned to one core, polling every simulated node once per interval.
//!
//! The only addition is a thin `StatusSource` wrapper that counts completed calls and the
//! gap between two answers from the same node; it costs one map lookup per call, small
//! next to a gRPC round trip. Calls cut off by the poller's timeout never reach the
//! wrapper's bookkeeping, so only answered polls are counted.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use celld_proto::v1 as pb;
use cellmaster::poll::{Change, Fleet, GrpcSource, NodeHealth, PollPolicy, Poller, StatusSource};
use tokio::time::Instant;

use crate::sim::{say, stdin_lines};
use crate::{Result, node_address, node_id, unix_micros};

pub struct MasterArgs {
    pub nodes: usize,
    pub policy: PollPolicy,
    /// Mutual TLS: the master's certificate from this CA, as `cellmaster serve` makes it.
    pub ca: Option<celld_trust::CellCa>,
}

/// Gaps are kept in 1 ms buckets up to this; longer ones land in the last bucket.
const GAP_BUCKETS_MS: usize = 10_000;

struct PollStats {
    answered: u64,
    full: u64,
    failed: u64,
    last_answer: HashMap<String, Instant>,
    gap_ms: Vec<u64>,
}

impl PollStats {
    fn reset(&mut self) {
        self.answered = 0;
        self.full = 0;
        self.failed = 0;
        self.gap_ms.iter_mut().for_each(|b| *b = 0);
    }

    fn gap_percentile(&self, p: f64) -> usize {
        let total: u64 = self.gap_ms.iter().sum();
        let want = ((total as f64) * p).ceil() as u64;
        let mut seen = 0;
        for (ms, n) in self.gap_ms.iter().enumerate() {
            seen += n;
            if seen >= want.max(1) {
                return ms;
            }
        }
        0
    }

    fn within(&self, limit_ms: usize) -> (u64, u64) {
        let total: u64 = self.gap_ms.iter().sum();
        let ok: u64 = self.gap_ms.iter().take(limit_ms + 1).sum();
        (ok, total)
    }
}

struct CountingSource {
    inner: GrpcSource,
    stats: Arc<Mutex<PollStats>>,
}

impl StatusSource for CountingSource {
    async fn get_status(
        &self,
        node: &str,
        address: &str,
        known: u64,
    ) -> std::result::Result<pb::NodeStatus, String> {
        let result = self.inner.get_status(node, address, known).await;
        let now = Instant::now();
        let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        match &result {
            Ok(status) => {
                stats.answered += 1;
                if !status.unchanged {
                    stats.full += 1;
                }
                let previous = stats.last_answer.insert(address.to_string(), now);
                if let Some(previous) = previous {
                    let ms = (now - previous).as_millis() as usize;
                    stats.gap_ms[ms.min(GAP_BUCKETS_MS)] += 1;
                }
            }
            Err(_) => stats.failed += 1,
        }
        result
    }

    fn forget(&self, address: &str) {
        self.inner.forget(address);
    }
}

pub async fn poll_fleet(args: MasterArgs) -> Result<()> {
    let fleet: Fleet = Arc::new(Mutex::new(
        (0..args.nodes)
            .map(|i| (node_id(i), NodeHealth::new(node_address(i).to_string())))
            .collect::<BTreeMap<_, _>>(),
    ));
    let stats = Arc::new(Mutex::new(PollStats {
        answered: 0,
        full: 0,
        failed: 0,
        last_answer: HashMap::with_capacity(args.nodes),
        gap_ms: vec![0; GAP_BUCKETS_MS + 1],
    }));
    let trust = match args.ca {
        Some(ca) => Some(Arc::new(cellmaster::trust::MasterTrust::new(
            ca,
            Duration::from_secs(86400),
        )?)),
        None => None,
    };
    let source = CountingSource {
        inner: GrpcSource::new(args.policy.timeout, trust),
        stats: stats.clone(),
    };
    let interval_ms = args.policy.interval.as_millis() as usize;
    let (poller, mut changes) = Poller::new(source, args.policy, fleet);
    tokio::spawn(poller.run());

    // What a reconciler would consume; here it only counts, and reports Down at once
    // so the driver can time detection.
    let total = args.nodes;
    tokio::spawn(async move {
        let mut ready = 0usize;
        while let Some((id, change)) = changes.recv().await {
            match change {
                Change::Ready => {
                    ready += 1;
                    if ready == total {
                        say(&format!("all_ready {}", unix_micros()));
                    }
                }
                Change::Down => say(&format!("down {id} {}", unix_micros())),
                Change::Unknown | Change::Status(_) => {}
            }
        }
    });

    let mut commands = stdin_lines();
    let mut since = Instant::now();
    while let Some(line) = commands.recv().await {
        let mut stats = stats.lock().unwrap_or_else(|p| p.into_inner());
        match line.trim() {
            "reset" => {
                stats.reset();
                since = Instant::now();
            }
            "report" => {
                let seconds = since.elapsed().as_secs_f64();
                // "Met the interval": the node answered again within 10% of one interval.
                let (met, gaps) = stats.within(interval_ms + interval_ms / 10);
                let report = serde_json::json!({
                    "seconds": seconds,
                    "answered": stats.answered,
                    "full": stats.full,
                    "failed": stats.failed,
                    "gaps": gaps,
                    "gaps_met": met,
                    "gap_p50_ms": stats.gap_percentile(0.5),
                    "gap_p99_ms": stats.gap_percentile(0.99),
                    "gap_max_ms": stats.gap_percentile(1.0),
                });
                say(&format!("report {report}"));
            }
            _ => {}
        }
    }
    Ok(())
}

/// The poll interval the benchmark asks for: one poll per node per second.
pub const INTERVAL: Duration = Duration::from_secs(1);

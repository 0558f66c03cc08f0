//! The poller against fake nodes, in paused time: tokio advances the clock whenever every
//! task waits, so intervals pass at once and the times asserted are exact.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use super::*;
use crate::poll::{Liveness, NodeHealth};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Behaviour {
    Answer,
    /// Refuses at once, like a closed port.
    Refuse,
    /// Never answers, like a wedged node with its connection up.
    Hang,
    /// Answers after this long.
    Slow(Duration),
}

/// Fake nodes by address, with a log of what the poller asked.
#[derive(Default)]
struct FakeState {
    behaviour: Mutex<HashMap<String, Behaviour>>,
    /// Behaviour from a given call of an address on (1-based), set before it happens.
    switch_at: Mutex<HashMap<String, (usize, Behaviour)>>,
    generation: AtomicU64,
    calls: Mutex<Vec<(String, Instant)>>,
    forgotten: Mutex<Vec<String>>,
    out: AtomicUsize,
    most_out: AtomicUsize,
}

#[derive(Clone, Default)]
struct Fake(Arc<FakeState>);

impl Fake {
    fn set(&self, address: &str, b: Behaviour) {
        self.0
            .behaviour
            .lock()
            .unwrap()
            .insert(address.to_string(), b);
    }

    fn calls_to(&self, address: &str) -> Vec<Instant> {
        let calls = self.0.calls.lock().unwrap();
        calls
            .iter()
            .filter(|(a, _)| a == address)
            .map(|c| c.1)
            .collect()
    }
}

impl StatusSource for Fake {
    async fn get_status(
        &self,
        _node: &str,
        address: &str,
        known: u64,
    ) -> Result<pb::NodeStatus, String> {
        let s = &self.0;
        let nth = {
            let mut calls = s.calls.lock().unwrap();
            calls.push((address.to_string(), Instant::now()));
            calls.iter().filter(|(a, _)| a == address).count()
        };
        let behaviour = match s.switch_at.lock().unwrap().get(address) {
            Some(&(from, b)) if nth >= from => b,
            _ => s
                .behaviour
                .lock()
                .unwrap()
                .get(address)
                .copied()
                .unwrap_or(Behaviour::Answer),
        };
        let out = s.out.fetch_add(1, Ordering::SeqCst) + 1;
        s.most_out.fetch_max(out, Ordering::SeqCst);
        let result = match behaviour {
            Behaviour::Refuse => Err("connection refused".to_string()),
            Behaviour::Hang => std::future::pending().await,
            Behaviour::Answer | Behaviour::Slow(_) => {
                if let Behaviour::Slow(d) = behaviour {
                    tokio::time::sleep(d).await;
                }
                let generation = s.generation.load(Ordering::SeqCst);
                Ok(pb::NodeStatus {
                    generation,
                    unchanged: known == generation,
                    ..Default::default()
                })
            }
        };
        s.out.fetch_sub(1, Ordering::SeqCst);
        result
    }

    fn forget(&self, address: &str) {
        self.0.forgotten.lock().unwrap().push(address.to_string());
    }
}

fn fleet(n: usize) -> Fleet {
    Arc::new(Mutex::new(
        (0..n)
            .map(|i| (format!("n{i}"), NodeHealth::new(format!("10.0.0.{i}:7100"))))
            .collect::<BTreeMap<_, _>>(),
    ))
}

fn start(
    fake: &Fake,
    policy: PollPolicy,
    fleet: &Fleet,
) -> mpsc::UnboundedReceiver<(String, Change)> {
    let (poller, rx) = Poller::new(fake.clone(), policy, fleet.clone());
    tokio::spawn(poller.run());
    rx
}

fn drain(rx: &mut mpsc::UnboundedReceiver<(String, Change)>) -> Vec<(String, Change)> {
    let mut out = Vec::new();
    while let Ok(c) = rx.try_recv() {
        out.push(c);
    }
    out
}

/// Waits for `id`'s next change matching `want`, returning it and when it came.
async fn next_for(
    rx: &mut mpsc::UnboundedReceiver<(String, Change)>,
    id: &str,
    want: impl Fn(&Change) -> bool,
) -> Instant {
    loop {
        let (who, c) = rx.recv().await.unwrap();
        if who == id && want(&c) {
            return Instant::now();
        }
    }
}

#[tokio::test(start_paused = true)]
async fn silent_nodes_go_unknown_then_down_and_come_back() {
    let fake = Fake::default();
    fake.0.generation.store(5, Ordering::SeqCst);
    fake.set("10.0.0.1:7100", Behaviour::Refuse);
    let f = fleet(2);
    let mut rx = start(&fake, PollPolicy::default(), &f);
    let mut n1 = Vec::new();
    while n1.last() != Some(&Change::Down) {
        let (id, c) = rx.recv().await.unwrap();
        if id == "n1" {
            n1.push(c);
        }
    }
    assert_eq!(n1, vec![Change::Unknown, Change::Down]);
    assert_eq!(f.lock().unwrap()["n1"].liveness, Liveness::Down);
    fake.set("10.0.0.1:7100", Behaviour::Answer);
    next_for(&mut rx, "n1", |c| *c == Change::Ready).await;
    let status = rx.recv().await.unwrap();
    assert!(matches!(status, (id, Change::Status(_)) if id == "n1"));
    let n0: Vec<_> = drain(&mut rx).into_iter().filter(|c| c.0 == "n0").collect();
    assert!(n0.is_empty(), "n0 answered throughout: {n0:?}");
    assert_eq!(f.lock().unwrap()["n0"].liveness, Liveness::Ready);
}

#[tokio::test(start_paused = true)]
async fn unchanged_generations_are_not_reported_again() {
    let fake = Fake::default();
    fake.0.generation.store(7, Ordering::SeqCst);
    let policy = PollPolicy::default();
    let interval = policy.interval;
    let mut rx = start(&fake, policy, &fleet(3));
    let mut first = Vec::new();
    while first.len() < 6 {
        first.push(rx.recv().await.unwrap());
    }
    assert_eq!(
        first.iter().filter(|c| c.1 == Change::Ready).count(),
        3,
        "{first:?}"
    );
    tokio::time::sleep(interval * 5).await;
    assert!(drain(&mut rx).is_empty());
    assert!(fake.calls_to("10.0.0.2:7100").len() >= 5, "still polled");
    fake.0.generation.store(8, Ordering::SeqCst);
    tokio::time::sleep(interval + Duration::from_millis(1)).await;
    let moved = drain(&mut rx);
    assert_eq!(moved.len(), 3, "{moved:?}");
    assert!(moved.iter().all(|c| matches!(c.1, Change::Status(_))));
}

/// The worst case for detection: the node stops right after an answer, so a whole
/// interval passes before its first missed poll.
async fn down_after_going_quiet_right_after_an_answer(quiet: Behaviour) {
    let fake = Fake::default();
    let f = fleet(2);
    let address = "10.0.0.1:7100";
    // Calls 1 to 3 are answered, the 4th and later are not.
    fake.0
        .switch_at
        .lock()
        .unwrap()
        .insert(address.to_string(), (4, quiet));
    let policy = PollPolicy::default();
    let interval = policy.interval;
    let mut rx = start(&fake, policy, &f);
    let down_at = next_for(&mut rx, "n1", |c| *c == Change::Down).await;
    let calls = fake.calls_to(address);
    let last_answered = calls[2];
    let quiet_for = down_at - last_answered;
    assert!(quiet_for <= interval * 3, "Down {quiet_for:?} after quiet");
    assert!(
        quiet_for >= interval * 2,
        "Down too eagerly: {quiet_for:?} after quiet"
    );
    // The other node went on answering every interval, and never flapped.
    let others = fake.calls_to("10.0.0.0:7100");
    assert!(others.windows(2).all(|w| w[1] - w[0] == interval));
    let n0: Vec<_> = drain(&mut rx).into_iter().filter(|c| c.0 == "n0").collect();
    assert!(
        n0.iter().all(|c| matches!(c.1, Change::Status(_))),
        "{n0:?}"
    );
    assert_eq!(f.lock().unwrap()["n0"].liveness, Liveness::Ready);
}

#[tokio::test(start_paused = true)]
async fn a_hung_node_is_down_within_three_intervals_of_its_last_answer() {
    down_after_going_quiet_right_after_an_answer(Behaviour::Hang).await;
}

#[tokio::test(start_paused = true)]
async fn a_closed_node_is_down_within_three_intervals_of_its_last_answer() {
    down_after_going_quiet_right_after_an_answer(Behaviour::Refuse).await;
}

#[tokio::test(start_paused = true)]
async fn first_polls_spread_over_one_interval() {
    let fake = Fake::default();
    let policy = PollPolicy::default();
    let interval = policy.interval;
    let t0 = Instant::now();
    let mut rx = start(&fake, policy, &fleet(10));
    // Generation 0 is what the master has: each node answers "unchanged", so Ready only.
    for _ in 0..10 {
        assert_eq!(rx.recv().await.unwrap().1, Change::Ready);
    }
    let mut firsts: Vec<Duration> = (0..10)
        .map(|i| fake.calls_to(&format!("10.0.0.{i}:7100"))[0] - t0)
        .collect();
    firsts.sort();
    firsts.dedup();
    assert_eq!(firsts.len(), 10, "no two nodes polled at once: {firsts:?}");
    assert!(firsts[9] < interval, "{firsts:?}");
}

#[tokio::test(start_paused = true)]
async fn calls_out_stay_within_the_bound() {
    let fake = Fake::default();
    for i in 0..20 {
        fake.set(
            &format!("10.0.0.{i}:7100"),
            Behaviour::Slow(Duration::from_millis(150)),
        );
    }
    let policy = PollPolicy {
        max_in_flight: 2,
        ..Default::default()
    };
    let interval = policy.interval;
    let f = fleet(20);
    let _rx = start(&fake, policy, &f);
    tokio::time::sleep(interval * 4).await;
    assert_eq!(fake.0.most_out.load(Ordering::SeqCst), 2);
    let fleet = f.lock().unwrap();
    assert!(fleet.values().all(|h| h.liveness == Liveness::Ready));
}

#[tokio::test(start_paused = true)]
async fn nodes_join_move_and_leave() {
    let fake = Fake::default();
    let policy = PollPolicy::default();
    let interval = policy.interval;
    let f = fleet(1);
    let mut rx = start(&fake, policy, &f);
    next_for(&mut rx, "n0", |c| *c == Change::Ready).await;

    // Joins: polled within two intervals (the next look at the fleet, then its slot).
    let joined = Instant::now();
    f.lock()
        .unwrap()
        .insert("late".into(), NodeHealth::new("10.9.9.9:7100".into()));
    let ready = next_for(&mut rx, "late", |c| *c == Change::Ready).await;
    assert!(ready - joined <= interval * 2, "{:?}", ready - joined);

    // Moves: the new address is asked, the old one forgotten and not asked again.
    f.lock().unwrap().get_mut("n0").unwrap().address = "10.0.1.1:7100".into();
    tokio::time::sleep(interval * 2).await;
    assert!(!fake.calls_to("10.0.1.1:7100").is_empty());
    assert_eq!(*fake.0.forgotten.lock().unwrap(), vec!["10.0.0.0:7100"]);
    let old_calls = fake.calls_to("10.0.0.0:7100").len();

    // Leaves: its task ends and its address is forgotten.
    f.lock().unwrap().remove("late");
    tokio::time::sleep(interval * 2).await;
    let late_calls = fake.calls_to("10.9.9.9:7100").len();
    tokio::time::sleep(interval * 3).await;
    assert_eq!(fake.calls_to("10.9.9.9:7100").len(), late_calls);
    assert_eq!(fake.calls_to("10.0.0.0:7100").len(), old_calls);
    assert!(
        fake.0
            .forgotten
            .lock()
            .unwrap()
            .contains(&"10.9.9.9:7100".to_string())
    );

    // Comes back under the same id: polled again.
    f.lock()
        .unwrap()
        .insert("late".into(), NodeHealth::new("10.9.9.9:7100".into()));
    next_for(&mut rx, "late", |c| *c == Change::Ready).await;
}

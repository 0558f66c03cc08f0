use super::*;

const GIB: u64 = 1 << 30;

fn node(id: &str, memory_gib: u64, cpu: u64) -> NodeView {
    NodeView {
        id: id.to_string(),
        ready: true,
        cordoned: false,
        labels: BTreeMap::new(),
        allocatable: Resources::new(memory_gib * GIB, cpu),
        used: Resources::default(),
    }
}

fn pending(id: &str, job: &str, priority: u32, memory_gib: u64, cpu: u64) -> PendingTask {
    PendingTask {
        task_id: id.to_string(),
        job: job.to_string(),
        priority,
        resources: Resources::new(memory_gib * GIB, cpu),
        constraints: Constraints::default(),
    }
}

/// A placed task, with its resources added to the node's `used` as the caller would.
fn place(
    nodes: &mut [NodeView],
    id: &str,
    job: &str,
    on: &str,
    priority: u32,
    memory_gib: u64,
    cpu: u64,
) -> PlacedTask {
    let n = nodes.iter_mut().find(|n| n.id == on).unwrap();
    n.used.memory_bytes += memory_gib * GIB;
    n.used.cpu_millis += cpu;
    PlacedTask {
        task_id: id.to_string(),
        job: job.to_string(),
        node: on.to_string(),
        priority,
        resources: Resources::new(memory_gib * GIB, cpu),
    }
}

fn nodes_of(decisions: &[Decision]) -> Vec<Option<&str>> {
    decisions.iter().map(Decision::node).collect()
}

#[test]
fn replicas_spread_across_nodes() {
    let nodes = vec![node("a", 8, 4000), node("b", 8, 4000), node("c", 8, 4000)];
    let tasks: Vec<_> = (0..3)
        .map(|i| pending(&format!("web-{i}"), "web", 100, 1, 500))
        .collect();
    let d = schedule(&nodes, &[], &tasks);
    let mut used: Vec<_> = nodes_of(&d).into_iter().map(Option::unwrap).collect();
    used.sort_unstable();
    assert_eq!(used, ["a", "b", "c"], "{d:?}");
}

#[test]
fn spreading_counts_replicas_already_placed() {
    let mut nodes = vec![node("a", 8, 4000), node("b", 8, 4000)];
    let placed = vec![place(&mut nodes, "web-0", "web", "a", 100, 1, 500)];
    let d = schedule(&nodes, &placed, &[pending("web-1", "web", 100, 1, 500)]);
    assert_eq!(nodes_of(&d), [Some("b")]);
    // Another job does not mind sharing: best fit sends it to the fuller node.
    let d = schedule(&nodes, &placed, &[pending("db-0", "db", 100, 1, 500)]);
    assert_eq!(nodes_of(&d), [Some("a")]);
}

#[test]
fn best_fit_prefers_the_tightest_node() {
    let nodes = vec![
        node("big", 64, 16000),
        node("small", 4, 2000),
        node("mid", 16, 8000),
    ];
    let d = schedule(&nodes, &[], &[pending("t", "j", 0, 3, 1500)]);
    assert_eq!(nodes_of(&d), [Some("small")]);
    // Too large for the small one: the next tightest.
    let d = schedule(&nodes, &[], &[pending("t", "j", 0, 8, 1500)]);
    assert_eq!(nodes_of(&d), [Some("mid")]);
}

#[test]
fn best_fit_counts_what_is_used() {
    let mut nodes = vec![node("a", 8, 4000), node("b", 8, 4000)];
    let placed = vec![place(&mut nodes, "other", "x", "b", 0, 6, 3000)];
    let d = schedule(&nodes, &placed, &[pending("t", "j", 0, 1, 500)]);
    assert_eq!(nodes_of(&d), [Some("b")]);
}

#[test]
fn earlier_placements_use_up_resources() {
    // Room for two of these on the one node, not three.
    let nodes = vec![node("a", 4, 4000)];
    let tasks: Vec<_> = (0..3)
        .map(|i| pending(&format!("t{i}"), &format!("j{i}"), 0, 2, 100))
        .collect();
    let d = schedule(&nodes, &[], &tasks);
    assert_eq!(nodes_of(&d), [Some("a"), Some("a"), None]);
    let Decision::Pending { reason, .. } = &d[2] else {
        panic!("{d:?}")
    };
    assert!(reason.contains("1 node full"), "{reason}");
}

#[test]
fn higher_priority_goes_first() {
    let nodes = vec![node("a", 2, 4000)];
    let tasks = vec![
        pending("low", "l", 10, 2, 100),
        pending("high", "h", 500, 2, 100),
        pending("mid", "m", 100, 2, 100),
    ];
    let d = schedule(&nodes, &[], &tasks);
    let order: Vec<&str> = d.iter().map(Decision::task_id).collect();
    assert_eq!(order, ["high", "mid", "low"]);
    assert_eq!(
        d[0],
        Decision::Place {
            task_id: "high".into(),
            node: "a".into()
        }
    );
    assert!(matches!(d[1], Decision::Pending { .. }), "{d:?}");
}

#[test]
fn equal_priority_goes_by_task_id() {
    let nodes = vec![node("a", 1, 4000)];
    let tasks = vec![pending("b", "j", 5, 1, 1), pending("a", "j", 5, 1, 1)];
    let d = schedule(&nodes, &[], &tasks);
    assert_eq!(
        d[0],
        Decision::Place {
            task_id: "a".into(),
            node: "a".into()
        }
    );
}

#[test]
fn preempts_only_strictly_lower_priority() {
    let mut nodes = vec![node("a", 4, 4000)];
    let placed = vec![
        place(&mut nodes, "batch-0", "batch", "a", 10, 2, 1000),
        place(&mut nodes, "same-0", "same", "a", 100, 2, 1000),
    ];
    let d = schedule(&nodes, &placed, &[pending("prod-0", "prod", 100, 2, 1000)]);
    assert_eq!(
        d,
        [Decision::Preempt {
            task_id: "prod-0".into(),
            node: "a".into(),
            victims: vec!["batch-0".into()]
        }]
    );
    // Equal priority is never preempted.
    let d = schedule(&nodes, &placed, &[pending("prod-0", "prod", 10, 2, 1000)]);
    assert!(
        matches!(&d[0], Decision::Pending { reason, .. } if reason.contains("full")),
        "{d:?}"
    );
}

#[test]
fn preemption_takes_the_fewest_lowest_victims() {
    let mut nodes = vec![node("a", 4, 4000), node("b", 4, 4000), node("c", 4, 4000)];
    let placed = vec![
        // a: two small tasks of priority 1 would both be needed.
        place(&mut nodes, "a1", "x", "a", 1, 2, 100),
        place(&mut nodes, "a2", "y", "a", 1, 2, 100),
        // b: one task, but of priority 50.
        place(&mut nodes, "b1", "z", "b", 50, 4, 100),
        // c: one task of priority 1 beside a higher one that is not needed.
        place(&mut nodes, "c1", "w", "c", 1, 3, 100),
        place(&mut nodes, "c2", "v", "c", 90, 1, 100),
    ];
    let d = schedule(&nodes, &placed, &[pending("t", "j", 100, 3, 100)]);
    assert_eq!(
        d,
        [Decision::Preempt {
            task_id: "t".into(),
            node: "c".into(),
            victims: vec!["c1".into()]
        }]
    );
}

#[test]
fn preemption_drops_victims_it_did_not_need() {
    // Greedy by priority takes the 1 GiB task first, then the 4 GiB one, which alone is
    // enough: the first is given back.
    let mut nodes = vec![node("a", 5, 4000)];
    let placed = vec![
        place(&mut nodes, "small", "x", "a", 1, 1, 100),
        place(&mut nodes, "large", "y", "a", 2, 4, 100),
    ];
    let d = schedule(&nodes, &placed, &[pending("t", "j", 100, 4, 100)]);
    assert_eq!(
        d,
        [Decision::Preempt {
            task_id: "t".into(),
            node: "a".into(),
            victims: vec!["large".into()]
        }]
    );
}

#[test]
fn a_victim_is_preempted_once() {
    let mut nodes = vec![node("a", 2, 4000)];
    let placed = vec![place(&mut nodes, "batch", "b", "a", 1, 2, 100)];
    let tasks = vec![
        pending("p1", "p", 100, 2, 100),
        pending("p2", "p", 100, 2, 100),
    ];
    let d = schedule(&nodes, &placed, &tasks);
    assert_eq!(
        d[0],
        Decision::Preempt {
            task_id: "p1".into(),
            node: "a".into(),
            victims: vec!["batch".into()]
        }
    );
    // p1 now holds the node and has the same priority: nothing left to take.
    assert!(matches!(d[1], Decision::Pending { .. }), "{d:?}");
}

#[test]
fn constraints_pick_labelled_nodes() {
    let mut nodes = vec![node("a", 8, 4000), node("b", 8, 4000), node("c", 8, 4000)];
    nodes[1].labels.insert("zone".into(), "b".into());
    nodes[2].labels.insert("zone".into(), "c".into());
    let mut t = pending("t", "j", 0, 1, 100);
    t.constraints.labels.insert("zone".into(), "c".into());
    let d = schedule(&nodes, &[], &[t.clone()]);
    assert_eq!(nodes_of(&d), [Some("c")]);
    t.constraints.labels.insert("zone".into(), "z".into());
    let d = schedule(&nodes, &[], &[t]);
    let Decision::Pending { reason, .. } = &d[0] else {
        panic!("{d:?}")
    };
    assert_eq!(
        reason,
        "no node fits 1 GiB memory, 100 cpu millis with labels zone=z: \
         3 nodes without the labels asked for"
    );
}

#[test]
fn the_reason_counts_every_node() {
    let mut nodes = vec![
        node("small-1", 1, 4000),
        node("small-2", 2, 4000),
        node("small-3", 8, 500),
        node("cordoned", 64, 8000),
        node("down", 64, 8000),
    ];
    nodes[3].cordoned = true;
    nodes[4].ready = false;
    let d = schedule(&nodes, &[], &[pending("t", "j", 0, 4, 1000)]);
    assert_eq!(
        d,
        [Decision::Pending {
            task_id: "t".into(),
            reason: "no node fits 4 GiB memory, 1000 cpu millis: \
                     1 not ready, 1 cordoned, 3 nodes too small"
                .into()
        }]
    );
    let d = schedule(&[], &[], &[pending("t", "j", 0, 4, 1000)]);
    assert!(
        matches!(&d[0], Decision::Pending { reason, .. } if reason.ends_with("the cell has no nodes"))
    );
}

#[test]
fn a_cordoned_or_unready_node_gets_nothing_even_by_preemption() {
    let mut nodes = vec![node("a", 4, 4000)];
    let placed = vec![place(&mut nodes, "low", "l", "a", 0, 4, 100)];
    nodes[0].cordoned = true;
    let d = schedule(&nodes, &placed, &[pending("t", "j", 1000, 1, 100)]);
    assert!(matches!(d[0], Decision::Pending { .. }), "{d:?}");
}

#[test]
fn pids_are_a_cap_not_a_sum() {
    let mut nodes = vec![node("a", 8, 4000)];
    nodes[0].allocatable.pids_max = 100;
    let mut t = pending("t", "j", 0, 1, 100);
    t.resources.pids_max = 64;
    let many = vec![
        t.clone(),
        PendingTask {
            task_id: "u".into(),
            ..t.clone()
        },
    ];
    assert_eq!(
        nodes_of(&schedule(&nodes, &[], &many)),
        [Some("a"), Some("a")]
    );
    t.resources.pids_max = 101;
    let d = schedule(&nodes, &[], &[t]);
    assert!(
        matches!(&d[0], Decision::Pending { reason, .. } if reason.contains("too small")),
        "{d:?}"
    );
}

#[test]
fn the_same_inputs_give_the_same_decisions() {
    let mut nodes: Vec<_> = (0..6).map(|i| node(&format!("n{i}"), 8, 4000)).collect();
    let placed: Vec<_> = (0..6)
        .map(|i| {
            place(
                &mut nodes,
                &format!("old{i}"),
                "old",
                &format!("n{i}"),
                1,
                4,
                1000,
            )
        })
        .collect();
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            pending(
                &format!("t{i:02}"),
                &format!("j{}", i % 3),
                (i % 4) * 10,
                2,
                700,
            )
        })
        .collect();
    let first = schedule(&nodes, &placed, &tasks);
    // Input order does not matter either.
    let mut rn = nodes.clone();
    rn.reverse();
    let mut rt = tasks.clone();
    rt.reverse();
    let mut rp = placed.clone();
    rp.reverse();
    for _ in 0..3 {
        assert_eq!(schedule(&nodes, &placed, &tasks), first);
    }
    assert_eq!(schedule(&rn, &rp, &rt), first);
}

mod properties {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn cell() -> impl Strategy<Value = (Vec<NodeView>, Vec<PlacedTask>, Vec<PendingTask>)> {
        let nodes =
            prop::collection::vec((1u64..16, 500u64..8000, any::<bool>(), any::<bool>()), 0..6);
        let placed = prop::collection::vec((0usize..6, 0u32..1000, 1u64..4, 1u64..2000), 0..12);
        let pend = prop::collection::vec((0u32..1000, 1u64..6, 1u64..3000, 0u8..3), 0..20);
        (nodes, placed, pend).prop_map(|(ns, ps, qs)| {
            let mut nodes: Vec<NodeView> = ns
                .iter()
                .enumerate()
                .map(|(i, &(mem, cpu, ready, cordoned))| NodeView {
                    ready: ready || i % 2 == 0,
                    cordoned: cordoned && i % 3 == 0,
                    ..node(&format!("n{i}"), mem, cpu)
                })
                .collect();
            let mut placed = Vec::new();
            for (k, &(n, prio, mem, cpu)) in ps.iter().enumerate() {
                let Some(target) = nodes.get(n % nodes.len().max(1)) else {
                    continue;
                };
                let (id, a, u) = (target.id.clone(), target.allocatable, target.used);
                // Only what fits: the caller's view never starts overcommitted.
                if u.memory_bytes + mem * GIB <= a.memory_bytes
                    && u.cpu_millis + cpu <= a.cpu_millis
                {
                    placed.push(place(
                        &mut nodes,
                        &format!("p{k}"),
                        &format!("pj{}", k % 3),
                        &id,
                        prio,
                        mem,
                        cpu,
                    ));
                }
            }
            let pending = qs
                .iter()
                .enumerate()
                .map(|(k, &(prio, mem, cpu, job))| {
                    pending(&format!("q{k}"), &format!("qj{job}"), prio, mem, cpu)
                })
                .collect();
            (nodes, placed, pending)
        })
    }

    proptest! {
        #[test]
        fn placements_never_overcommit((nodes, placed, pending) in cell()) {
            let d = schedule(&nodes, &placed, &pending);
            prop_assert_eq!(d.len(), pending.len());
            let by_id: BTreeMap<&str, &PendingTask> = pending.iter().map(|t| (t.task_id.as_str(), t)).collect();
            let placed_by_id: BTreeMap<&str, &PlacedTask> = placed.iter().map(|t| (t.task_id.as_str(), t)).collect();
            let mut used: BTreeMap<&str, (u64, u64)> = nodes
                .iter()
                .map(|n| (n.id.as_str(), (n.used.memory_bytes, n.used.cpu_millis)))
                .collect();
            let mut victims_seen = BTreeSet::new();
            let mut decided = BTreeSet::new();
            for dec in &d {
                prop_assert!(decided.insert(dec.task_id()), "two decisions for {}", dec.task_id());
                let task = by_id[dec.task_id()];
                if let Decision::Preempt { node, victims, .. } = dec {
                    for v in victims {
                        prop_assert!(victims_seen.insert(v.clone()), "{} preempted twice", v);
                        let victim = placed_by_id[v.as_str()];
                        prop_assert_eq!(&victim.node, node);
                        prop_assert!(victim.priority < task.priority);
                        let u = used.get_mut(node.as_str()).unwrap();
                        u.0 -= victim.resources.memory_bytes;
                        u.1 -= victim.resources.cpu_millis;
                    }
                }
                if let Some(n) = dec.node() {
                    let view = nodes.iter().find(|v| v.id == n).unwrap();
                    prop_assert!(view.ready && !view.cordoned);
                    let u = used.get_mut(n).unwrap();
                    u.0 += task.resources.memory_bytes;
                    u.1 += task.resources.cpu_millis;
                    prop_assert!(u.0 <= view.allocatable.memory_bytes, "{} memory overcommitted", n);
                    prop_assert!(u.1 <= view.allocatable.cpu_millis, "{} cpu overcommitted", n);
                }
            }
        }
    }
}

//! Tasks moving in a real cell on loopback: a hung node's tasks are lost and placed
//! elsewhere, and when it answers again its stale copies are killed; a dead machine's
//! tasks move; a higher-priority job preempts; a drain keeps within a job's budget.

mod common;

use common::Cell;

fn states(cell: &Cell, job: &str) -> Vec<(String, String)> {
    cell.tasks()
        .into_iter()
        .filter(|(id, _)| id.starts_with(&format!("{job}-")))
        .map(|(_, (state, node))| (state, node))
        .collect()
}

fn all_running(cell: &Cell, job: &str, n: usize) -> Option<Vec<String>> {
    let s = states(cell, job);
    (s.len() == n && s.iter().all(|(state, _)| state == "running"))
        .then(|| s.into_iter().map(|(_, node)| node).collect())
}

/// A master and two ready nodes, alpha and beta.
fn two_nodes() -> Cell {
    let mut cell = Cell::new(300);
    cell.add_node("alpha");
    cell.add_node("beta");
    cell.wait_ready(&["alpha", "beta"]);
    cell
}

#[test]
fn a_hung_nodes_tasks_move_and_its_stale_copies_die_when_it_returns() {
    let mut cell = two_nodes();
    let out = cell.submit(
        "web",
        "replicas = 2\n[resources]\nmemory = \"16MiB\"\ncpu_millis = 100\n",
    );
    assert_eq!(out.code, 0, "{out:?}");
    let mut nodes = cell.wait("web running", 30, || all_running(&cell, "web", 2));
    nodes.sort();
    assert_eq!(nodes, ["alpha", "beta"]);
    let on_beta = cell.running_on("beta");
    assert_eq!(on_beta.len(), 1, "{on_beta:?}");

    // beta hangs: Down, its replica is lost and placed on alpha.
    cell.pause_node("beta", true);
    cell.wait("beta's replica moved to alpha", 30, || {
        all_running(&cell, "web", 2).filter(|n| n.iter().all(|n| n == "alpha"))
    });
    let reason = cell.json(&["describe", "task", "web-0"]);
    assert!(reason["attempt"].as_u64().unwrap() >= 1, "{reason:#}");

    // beta answers again, still running the old copy: the master kills it.
    cell.pause_node("beta", false);
    cell.wait_ready(&["beta"]);
    cell.wait("stale copy on beta killed", 30, || {
        cell.running_on("beta").is_empty().then_some(())
    });
    cell.assert_no_duplicates();
    assert_eq!(cell.running_on("alpha").len(), 2);

    // alpha's machine dies with its tasks: both replicas go to beta.
    cell.kill_node("alpha");
    let nodes = cell.wait("replicas moved to beta", 30, || {
        all_running(&cell, "web", 2).filter(|n| n.iter().all(|n| n == "beta"))
    });
    assert_eq!(nodes.len(), 2);
    assert_eq!(cell.running_on("beta").len(), 2);
}

#[test]
fn a_higher_priority_job_preempts_and_the_victim_says_why_it_waits() {
    let cell = two_nodes();
    // Each node has 1900 m of CPU to give (2 CPUs, 100 m reserved): one batch replica each.
    let out = cell.submit(
        "batch",
        "replicas = 2\npriority = 10\n[resources]\nmemory = \"16MiB\"\ncpu_millis = 1500\n",
    );
    assert_eq!(out.code, 0, "{out:?}");
    cell.wait("batch running", 30, || all_running(&cell, "batch", 2));
    let out = cell.submit(
        "prod",
        "replicas = 1\npriority = 200\n[resources]\nmemory = \"16MiB\"\ncpu_millis = 1000\n",
    );
    assert_eq!(out.code, 0, "{out:?}");
    let prod_node = cell.wait("prod running", 30, || all_running(&cell, "prod", 1))[0].clone();
    let batch = cell.wait("one batch replica preempted and waiting", 30, || {
        let s = cell.json(&["tasks"]);
        let waiting: Vec<serde_json::Value> = s
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["job"] == "batch" && t["state"] != "running")
            .cloned()
            .collect();
        (waiting.len() == 1 && waiting[0]["state"] == "preempted").then(|| waiting[0].clone())
    });
    let reason = batch["reason"].as_str().unwrap();
    assert!(
        reason.contains("CPU") || reason.contains("cpu"),
        "{batch:#}"
    );
    // The victim no longer runs on prod's node; prod does.
    let there = cell.running_on(&prod_node);
    assert!(there.iter().any(|t| t.starts_with("prod-0-")), "{there:?}");
    assert!(
        !there
            .iter()
            .any(|t| t.starts_with(batch["id"].as_str().unwrap())),
        "{there:?}"
    );
    cell.assert_no_duplicates();
}

#[test]
fn a_drain_evicts_within_the_budget_and_waits_for_replacements() {
    let cell = two_nodes();
    let out = cell.submit(
        "web",
        "replicas = 3\n[resources]\nmemory = \"16MiB\"\ncpu_millis = 100\n[budget]\nmax_unavailable = 1\n",
    );
    assert_eq!(out.code, 0, "{out:?}");
    let nodes = cell.wait("web running", 30, || all_running(&cell, "web", 3));
    // The node with two replicas is drained: the budget lets one go at a time.
    let busy = if nodes.iter().filter(|n| *n == "alpha").count() == 2 {
        "alpha"
    } else {
        "beta"
    };
    let other = if busy == "alpha" { "beta" } else { "alpha" };
    let out = cell.cli(&["drain", busy, "--timeout-s", "60"]);
    assert_eq!(out.code, 0, "{out:?}\n{}", cell.log());
    assert!(out.stdout.contains("drained"), "{}", out.stdout);
    assert!(
        out.stdout.contains("waiting"),
        "no waiting for the budget: {}",
        out.stdout
    );
    let nodes = all_running(&cell, "web", 3).expect("all replicas running after the drain");
    assert!(nodes.iter().all(|n| n == other), "{nodes:?}");
    assert!(cell.running_on(busy).is_empty());
    let listed = cell.json(&["nodes"]);
    let row = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == busy)
        .unwrap()
        .clone();
    assert_eq!(row["cordoned"], true, "{row:#}");
    // Uncordoned, it takes work again: a new job spreads onto it.
    assert_eq!(cell.cli(&["uncordon", busy]).code, 0);
    let out = cell.submit(
        "more",
        "replicas = 2\n[resources]\nmemory = \"16MiB\"\ncpu_millis = 100\n",
    );
    assert_eq!(out.code, 0, "{out:?}");
    let more = cell.wait("more running", 30, || all_running(&cell, "more", 2));
    assert!(more.iter().any(|n| n == busy), "{more:?}");
    cell.assert_no_duplicates();
}

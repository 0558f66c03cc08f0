//! `kill -9` of the master at different points (right after a submission, during
//! placement, while tasks start, during a drain) and a restart on the same state file:
//! no job, task or node is lost, and no task runs twice.

mod common;

use std::time::Duration;

use common::Cell;

/// Every task of the master is running, each exactly once, as the attempt the master
/// recorded, on the node the master recorded.
fn all_running_once(cell: &Cell, jobs: usize, replicas: usize) -> Option<()> {
    let tasks = cell.json(&["tasks"]);
    let tasks = tasks.as_array().unwrap();
    if tasks.len() != jobs * replicas || tasks.iter().any(|t| t["state"] != "running") {
        return None;
    }
    for t in tasks {
        let node = t["node"].as_str().unwrap();
        let want = format!("{}-{}", t["id"].as_str().unwrap(), t["attempt"]);
        if !cell.running_on(node).contains(&want) {
            return None;
        }
    }
    cell.assert_no_duplicates();
    Some(())
}

#[test]
fn kill_9_of_the_master_loses_nothing_and_duplicates_nothing() {
    let mut cell = Cell::new(300);
    cell.add_node("alpha");
    cell.add_node("beta");
    cell.wait_ready(&["alpha", "beta"]);
    let delays = [0u64, 15, 40, 90, 200, 450, 900];
    for (round, delay) in delays.iter().enumerate() {
        let out = cell.submit(
            &format!("r{round}"),
            "replicas = 2\n[resources]\nmemory = \"8MiB\"\ncpu_millis = 50\n",
        );
        assert_eq!(out.code, 0, "round {round}: {out:?}");
        std::thread::sleep(Duration::from_millis(*delay));
        cell.kill_master();
        cell.start_master();
        // Nothing submitted so far is missing, right after the restart.
        let jobs = cell.json(&["jobs"]);
        assert_eq!(jobs.as_array().unwrap().len(), round + 1, "{jobs:#}");
        cell.assert_no_duplicates();
    }
    // The nodes were not told to register again: the master knows them from its store.
    cell.wait_ready(&["alpha", "beta"]);
    cell.wait("every task running exactly once", 60, || {
        all_running_once(&cell, delays.len(), 2)
    });

    // A drain cut short by a crash: the node stays cordoned, nothing runs twice, and a
    // second drain finishes the work.
    let child = cell
        .cli_command(&["drain", "alpha"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let _drain = common::Proc(child);
    std::thread::sleep(Duration::from_millis(700));
    cell.kill_master();
    cell.start_master();
    cell.assert_no_duplicates();
    let nodes = cell.json(&["nodes"]);
    let alpha = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == "alpha")
        .unwrap()
        .clone();
    assert_eq!(alpha["cordoned"], true, "{alpha:#}");
    cell.wait_ready(&["alpha", "beta"]);
    let out = cell.cli(&["drain", "alpha", "--timeout-s", "120"]);
    assert_eq!(out.code, 0, "{out:?}\n{}", cell.log());
    cell.wait("every task running exactly once on beta", 60, || {
        all_running_once(&cell, delays.len(), 2)
    });
    assert!(cell.running_on("alpha").is_empty());
    let tasks = cell.tasks();
    assert!(tasks.values().all(|(_, node)| node == "beta"), "{tasks:#?}");
}

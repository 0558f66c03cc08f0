//! A real cellmaster and real celld daemons on loopback: nodes register, the master polls
//! them, `cellmaster nodes` shows them, a job's replicas spread, and a killed node goes
//! Down within three polls.

mod common;

use std::time::{Duration, Instant};

use common::Cell;

fn liveness(cell: &Cell, id: &str) -> String {
    cell.json(&["nodes"])
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == id)
        .map(|n| n["liveness"].as_str().unwrap().to_string())
        .unwrap_or_default()
}

#[test]
fn nodes_register_are_polled_and_a_dead_one_goes_down() {
    let interval_ms = 300u64;
    let mut cell = Cell::new(interval_ms);
    cell.add_node("alpha");
    cell.add_node("beta");
    cell.wait_ready(&["alpha", "beta"]);
    // The table for people.
    let out = cell.cli(&["nodes"]);
    assert!(out.stdout.starts_with("NODE"), "{out:?}");
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with("alpha") && l.contains("READY")),
        "{out:?}"
    );

    // A job of two replicas lands one on each node (spread), and runs.
    let out = cell.submit(
        "sleeper",
        "replicas = 2\n[resources]\nmemory = \"32MiB\"\ncpu_millis = 100\n",
    );
    assert_eq!(out.code, 0, "{out:?}");
    let mut on = cell.wait("job placed and running", 30, || {
        let t = cell.tasks();
        (t.len() == 2 && t.values().all(|(s, _)| s == "running"))
            .then(|| t.into_values().map(|(_, n)| n).collect::<Vec<_>>())
    });
    on.sort();
    assert_eq!(on, ["alpha", "beta"], "replicas not spread");

    // beta dies without a word.
    let killed = Instant::now();
    cell.kill_node("beta");
    cell.wait("beta down", 20, || {
        (liveness(&cell, "beta") == "DOWN").then_some(())
    });
    assert_eq!(liveness(&cell, "alpha"), "READY");
    // Three missed polls, each at most an interval apart plus its timeout.
    let took = killed.elapsed();
    assert!(
        took <= Duration::from_millis(interval_ms * 3 + 3 * 300 + 500),
        "Down after {took:?}"
    );
}

#[test]
fn a_node_listed_in_the_config_is_polled_without_registering() {
    let port = common::free_port();
    let cell_port = port;
    let mut cell = Cell::with(300, |cell| {
        let config = cell.dir.path().join("master.toml");
        std::fs::write(
            &config,
            format!(
                "down_after = 3\n[[node]]\nid = \"listed\"\naddress = \"127.0.0.1:{cell_port}\"\n\
                 labels = {{ rack = \"r7\" }}\n"
            ),
        )
        .unwrap();
        cell.serve_args = vec!["--config".into(), config.display().to_string()];
        // A node that never registers gets no certificate: listed nodes are for cells
        // run without TLS.
        cell.secure = false;
    });
    cell.add_node_on("listed", port, false);
    cell.wait_ready(&["listed"]);
    let node = cell.json(&["describe", "node", "listed"]);
    assert_eq!(node["labels"]["rack"], "r7", "{node:#}");
    let out = cell.submit(
        "pinned",
        "[resources]\nmemory = \"8MiB\"\ncpu_millis = 50\n[constraints]\nlabels = { rack = \"r7\" }\n",
    );
    assert_eq!(out.code, 0, "{out:?}");
    cell.wait("pinned running on the listed node", 30, || {
        (cell.tasks()["pinned-0"] == ("running".to_string(), "listed".to_string())).then_some(())
    });
}

//! A real cellmaster and real celld daemons on loopback: nodes register, the master polls
//! them, `cellmaster nodes` shows them, and a killed node goes Down.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn celld() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/celld");
    assert!(
        p.exists(),
        "{} is missing: build it first (cargo build -p celld; cargo test --workspace does)",
        p.display()
    );
    p
}

fn nodes_json(master: &str) -> Vec<serde_json::Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_cellmaster"))
        .args(["nodes", "--master", master, "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn liveness(nodes: &[serde_json::Value], id: &str) -> String {
    nodes
        .iter()
        .find(|n| n["id"] == id)
        .map(|n| n["liveness"].as_str().unwrap().to_string())
        .unwrap_or_default()
}

#[test]
fn nodes_register_are_polled_and_a_dead_one_goes_down() {
    assert!(
        nix_is_root(),
        "celld needs root for its state and cgroups: run this test as root"
    );
    let mport = free_port();
    let master = format!("127.0.0.1:{mport}");
    let interval_ms = 300u64;
    let _m = Proc(
        Command::new(env!("CARGO_BIN_EXE_cellmaster"))
            .args(["serve", "--listen", &master])
            .args(["--poll-interval-ms", &interval_ms.to_string()])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = Vec::new();
    for name in ["alpha", "beta"] {
        let port = free_port();
        nodes.push(Proc(
            Command::new(celld())
                .args(["--listen", &format!("127.0.0.1:{port}")])
                .args(["--master", &master, "--hostname", name])
                .args(["--cgroup-parent", &format!("celld-fleet-{name}-{port}")])
                .arg("--state-dir")
                .arg(dir.path().join(name))
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        ));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n = nodes_json(&master);
        if liveness(&n, "alpha") == "READY" && liveness(&n, "beta") == "READY" {
            break;
        }
        assert!(Instant::now() < deadline, "nodes not ready: {n:#?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The table for people.
    let out = Command::new(env!("CARGO_BIN_EXE_cellmaster"))
        .args(["nodes", "--master", &master])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.starts_with("NODE"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("alpha") && l.contains("READY")),
        "{table}"
    );

    // beta dies without a word.
    let beta = nodes.pop().unwrap();
    let killed = Instant::now();
    drop(beta);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let n = nodes_json(&master);
        if liveness(&n, "beta") == "DOWN" {
            assert_eq!(liveness(&n, "alpha"), "READY");
            break;
        }
        assert!(Instant::now() < deadline, "beta never went down: {n:#?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Three missed polls, each at most an interval apart plus its timeout.
    let took = killed.elapsed();
    assert!(
        took <= Duration::from_millis(interval_ms * 3 + 3 * 300 + 500),
        "Down after {took:?}"
    );
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        .unwrap_or(false)
}

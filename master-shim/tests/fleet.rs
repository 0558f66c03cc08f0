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
    let dir = tempfile::tempdir().unwrap();
    let _m = Proc(
        Command::new(env!("CARGO_BIN_EXE_cellmaster"))
            .args(["serve", "--listen", &master])
            .arg("--state")
            .arg(dir.path().join("state.db"))
            .args(["--poll-interval-ms", &interval_ms.to_string()])
            .stderr(std::fs::File::create(dir.path().join("master.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let up = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(&master).is_err() {
        assert!(Instant::now() < up, "cellmaster did not start listening");
        std::thread::sleep(Duration::from_millis(50));
    }
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

    // A job of two replicas lands one on each node (spread), and runs.
    let rootfs = dir.path().join("rootfs");
    for d in ["bin", "proc", "dev", "sys", "tmp"] {
        std::fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox"))
        .expect("/bin/busybox: apt-get install -y busybox-static");
    std::os::unix::fs::symlink("busybox", rootfs.join("bin/sleep")).unwrap();
    let job = dir.path().join("sleeper.toml");
    std::fs::write(
        &job,
        format!(
            "name = \"sleeper\"\nreplicas = 2\nargv = [\"sleep\", \"600\"]\nrootfs = {:?}\n\
             [resources]\nmemory = \"32MiB\"\ncpu_millis = 100\n",
            rootfs.display().to_string()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cellmaster"))
        .args(["submit"])
        .arg(&job)
        .args(["--master", &master])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let placed = loop {
        let out = Command::new(env!("CARGO_BIN_EXE_cellmaster"))
            .args(["tasks", "--master", &master, "--json"])
            .output()
            .unwrap();
        let tasks: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        if tasks.len() == 2 && tasks.iter().all(|t| t["state"] == "running") {
            break tasks;
        }
        assert!(
            Instant::now() < deadline,
            "job not placed: {tasks:#?}\nmaster log:\n{}",
            std::fs::read_to_string(dir.path().join("master.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut on: Vec<&str> = placed.iter().map(|t| t["node"].as_str().unwrap()).collect();
    on.sort();
    assert_eq!(on, ["alpha", "beta"], "replicas not spread: {placed:#?}");
    // A bad job file is refused with its line and field, and nothing is stored.
    std::fs::write(&job, "name = \"x\"\nreplica = 2\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cellmaster"))
        .args(["submit"])
        .arg(&job)
        .args(["--master", &master])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 2") && err.contains("replica"), "{err}");

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

//! A cell on one machine: a bridge in a network namespace, dnsmasq handing out addresses
//! and the master's iPXE URL, cellmaster serving iPXE, the image and gRPC, and two QEMU
//! machines that PXE-boot through their NIC's iPXE ROM into the image, register with the
//! master and are polled by it; a job's two replicas run one on each machine, and when one
//! machine is switched off its replica moves to the other.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use celld_system_tests::{artifacts, vm_turn};

const BRIDGE_IP: &str = "10.77.0.1";

/// Kills the process when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The network namespace with its bridge and taps; removed when dropped.
struct Net {
    ns: String,
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Net {
    fn new(taps: usize) -> Net {
        let ns = format!("celld-cell-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        sh(&["ip", "netns", "add", &ns]);
        let net = Net { ns: ns.clone() };
        let x = |args: &[&str]| {
            let mut full = vec!["ip", "netns", "exec", &ns];
            full.extend_from_slice(args);
            sh(&full);
        };
        x(&["ip", "link", "set", "lo", "up"]);
        x(&["ip", "link", "add", "br0", "type", "bridge"]);
        x(&[
            "ip",
            "addr",
            "add",
            &format!("{BRIDGE_IP}/24"),
            "dev",
            "br0",
        ]);
        x(&["ip", "link", "set", "br0", "up"]);
        for i in 0..taps {
            let tap = format!("tap{i}");
            x(&["ip", "tuntap", "add", "dev", &tap, "mode", "tap"]);
            x(&["ip", "link", "set", &tap, "master", "br0"]);
            x(&["ip", "link", "set", &tap, "up"]);
        }
        net
    }

    fn command(&self, program: impl Into<PathBuf>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns]).arg(program.into());
        c
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

fn workspace_bin(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/debug")
        .join(name);
    assert!(
        p.exists(),
        "{} is missing: cargo build -p cellmaster (cargo test --workspace builds it)",
        p.display()
    );
    p
}

/// `cellmaster ARGS --master BRIDGE_IP:7000` inside the namespace.
fn cellmaster(net: &Net, args: &[&str]) -> std::process::Output {
    net.command(workspace_bin("cellmaster"))
        .args(args)
        .args(["--master", &format!("{BRIDGE_IP}:7000")])
        .output()
        .unwrap()
}

/// Task id -> (state, node) as the master sees it.
fn tasks(net: &Net) -> Vec<(String, String, String)> {
    let out = cellmaster(net, &["tasks", "--json"]);
    let tasks: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
    tasks
        .iter()
        .map(|t| {
            let s = |k: &str| t[k].as_str().unwrap_or_default().to_string();
            (s("id"), s("state"), s("node"))
        })
        .collect()
}

#[test]
fn two_machines_pxe_boot_from_the_master_register_and_run_a_jobs_replicas() {
    assert!(
        std::fs::read_to_string("/proc/self/status")
            .unwrap_or_default()
            .lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")),
        "this test makes a network namespace, a bridge and taps: run it as root"
    );
    let a = artifacts();
    let _turn = vm_turn();
    let dir = tempfile::tempdir().unwrap();
    let net = Net::new(2);
    let _dnsmasq = Proc(
        net.command("dnsmasq")
            .args(["--no-daemon", "--conf-file=/dev/null", "--interface=br0"])
            .args(["--bind-interfaces", "--no-ping", "--port=0"])
            .arg("--dhcp-range=10.77.0.100,10.77.0.150,12h")
            .arg(format!("--dhcp-boot=http://{BRIDGE_IP}:7080/ipxe"))
            .arg(format!(
                "--dhcp-leasefile={}",
                dir.path().join("leases").display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dnsmasq is missing: apt-get install -y dnsmasq"),
    );
    let master_log = std::fs::File::create(dir.path().join("master.log")).unwrap();
    let _master = Proc(
        net.command(workspace_bin("cellmaster"))
            .args(["serve", "--listen", &format!("{BRIDGE_IP}:7000")])
            .args(["--http", &format!("{BRIDGE_IP}:7080")])
            .arg("--image-dir")
            .arg(&a.dir)
            .args(["--poll-interval-ms", "1000"])
            .arg("--state")
            .arg(dir.path().join("state.db"))
            .stderr(master_log)
            .spawn()
            .unwrap(),
    );
    let mut vms = Vec::new();
    let mut serials = Vec::new();
    for i in 0..2 {
        let serial = dir.path().join(format!("node{i}.log"));
        serials.push(serial.clone());
        vms.push(Proc(
            net.command("qemu-system-x86_64")
                .args(["-accel", "tcg", "-m", "512", "-display", "none"])
                .args(["-monitor", "none", "-no-reboot", "-boot", "n"])
                .arg("-netdev")
                .arg(format!("tap,id=n0,ifname=tap{i},script=no,downscript=no"))
                .arg("-device")
                .arg(format!(
                    "virtio-net-pci,netdev=n0,mac=52:54:00:77:00:0{}",
                    i + 1
                ))
                .arg("-serial")
                .arg(format!("file:{}", serial.display()))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .expect("qemu-system-x86_64 is missing: apt-get install -y qemu-system-x86"),
        ));
    }
    let consoles = || {
        let mut s = format!(
            "master log:\n{}\n",
            std::fs::read_to_string(dir.path().join("master.log")).unwrap_or_default()
        );
        for serial in &serials {
            s += &format!(
                "--- {}:\n{}\n",
                serial.display(),
                String::from_utf8_lossy(&std::fs::read(serial).unwrap_or_default())
            );
        }
        s
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    let nodes = loop {
        let out = net
            .command(workspace_bin("cellmaster"))
            .args(["nodes", "--master", &format!("{BRIDGE_IP}:7000"), "--json"])
            .output()
            .unwrap();
        let nodes: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let ready = nodes.iter().filter(|n| n["liveness"] == "READY").count();
        if ready == 2 {
            break nodes;
        }
        assert!(
            Instant::now() < deadline,
            "two nodes did not become READY: {nodes:#?}\n{}",
            consoles()
        );
        std::thread::sleep(Duration::from_secs(1));
    };
    let mut ids: Vec<&str> = nodes.iter().map(|n| n["id"].as_str().unwrap()).collect();
    ids.sort();
    assert_eq!(ids, ["node-770001", "node-770002"], "{nodes:#?}");
    for n in &nodes {
        assert_eq!(n["image_version"], a.version.as_str(), "{n:#?}");
        assert!(
            n["address"].as_str().unwrap().starts_with("10.77.0.1"),
            "{n:#?}"
        );
    }

    // A job of two replicas from the image's busybox rootfs: one on each machine.
    let job = dir.path().join("web.toml");
    std::fs::write(
        &job,
        "name = \"web\"\nreplicas = 2\npriority = 100\nargv = [\"httpd\", \"-f\", \"-p\", \"8080\"]\n\
         rootfs = \"/rootfs/busybox\"\n[resources]\nmemory = \"16MiB\"\ncpu_millis = 100\n",
    )
    .unwrap();
    let out = cellmaster(&net, &["submit", job.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let t = tasks(&net);
        let mut on: Vec<&str> = t
            .iter()
            .filter(|(_, state, _)| state == "running")
            .map(|(_, _, node)| node.as_str())
            .collect();
        on.sort();
        if on == ["node-770001", "node-770002"] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "web's replicas not running on both machines: {t:?}\n{}",
            consoles()
        );
        std::thread::sleep(Duration::from_secs(1));
    }

    // The second machine is switched off: its replica moves to the first.
    drop(vms.remove(1));
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let t = tasks(&net);
        let moved = t.len() == 2
            && t.iter()
                .all(|(_, state, node)| state == "running" && node == "node-770001");
        if moved {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replica of the switched-off machine did not move: {t:?}\n{}",
            consoles()
        );
        std::thread::sleep(Duration::from_secs(1));
    }

    let dir_keep = std::env::var_os("CELLD_CONSOLE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/consoles"));
    let _ = std::fs::create_dir_all(&dir_keep);
    let _ = std::fs::write(dir_keep.join("cell.log"), consoles());
}

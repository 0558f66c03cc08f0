//! A PXE cell on one machine: a network namespace with a bridge and taps, dnsmasq handing
//! out addresses and the master's iPXE URL, `cellmaster serve` on the bridge, and QEMU
//! machines that PXE-boot through their NIC's iPXE ROM. Everything is removed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The bridge's address: dnsmasq, the master's gRPC (7000) and HTTP (7080).
pub const BRIDGE_IP: &str = "10.77.0.1";

/// Kills the process when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The network namespace with its bridge and taps; removed when dropped.
pub struct Net {
    pub ns: String,
}

impl Net {
    pub fn new(taps: usize) -> Net {
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

    pub fn command(&self, program: impl Into<PathBuf>) -> Command {
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

pub fn workspace_bin(name: &str) -> PathBuf {
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

pub fn require_root() {
    assert!(
        std::fs::read_to_string("/proc/self/status")
            .unwrap_or_default()
            .lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")),
        "this test makes a network namespace, a bridge and taps: run it as root"
    );
}

pub struct PxeCell {
    pub dir: tempfile::TempDir,
    // Dropped in this order: machines, master, dnsmasq, then the namespace.
    pub vms: Vec<Option<Proc>>,
    master: Option<Proc>,
    _dnsmasq: Proc,
    pub net: Net,
    pub serials: Vec<PathBuf>,
    /// Mutual TLS: the CLI uses the admin bundle at `dir/admin.bundle`.
    secure: bool,
}

impl PxeCell {
    /// The namespace with `machines` taps, dnsmasq, and `cellmaster serve` on the bridge
    /// with `master_args` added (e.g. `--image-dir`). Machines are not started yet.
    /// Plain text: for images built with `celld.insecure=1`.
    pub fn start(machines: usize, master_args: &[&str]) -> PxeCell {
        PxeCell::start_with(machines, master_args, false)
    }

    /// Mutual TLS, as deployed: the master makes the cell CA, an admin bundle is written
    /// for the CLI, and a join token for PXE-booting nodes is made once the master is up
    /// (its iPXE script then hands out `celld.ca=` and `celld.join=`).
    pub fn start_secure(machines: usize, master_args: &[&str]) -> PxeCell {
        PxeCell::start_with(machines, master_args, true)
    }

    fn start_with(machines: usize, master_args: &[&str], secure: bool) -> PxeCell {
        require_root();
        let dir = tempfile::tempdir().unwrap();
        let net = Net::new(machines);
        let dnsmasq = Proc(
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
        let state = dir.path().join("state.db");
        if secure {
            let out = Command::new(workspace_bin("cellmaster"))
                .args(["admin-cert", "--role", "admin", "--out"])
                .arg(dir.path().join("admin.bundle"))
                .arg("--state")
                .arg(&state)
                .output()
                .unwrap();
            assert!(out.status.success(), "admin-cert: {out:?}");
        }
        let master_log = std::fs::File::create(dir.path().join("master.log")).unwrap();
        let master = Proc(
            net.command(workspace_bin("cellmaster"))
                .args(["serve", "--listen", &format!("{BRIDGE_IP}:7000")])
                .args(["--http", &format!("{BRIDGE_IP}:7080")])
                .args(["--poll-interval-ms", "1000"])
                .args(if secure { &[][..] } else { &["--insecure"][..] })
                .arg("--state")
                .arg(&state)
                .args(master_args)
                .stderr(master_log)
                .spawn()
                .unwrap(),
        );
        let cell = PxeCell {
            dir,
            vms: Vec::new(),
            master: Some(master),
            _dnsmasq: dnsmasq,
            net,
            serials: Vec::new(),
            secure,
        };
        if secure {
            cell.wait("a PXE join token from the master", 30, || {
                let out =
                    cell.cellmaster(&["token", "create", "--ttl", "1h", "--uses", "20", "--pxe"]);
                out.status.success().then_some(())
            });
        }
        cell
    }

    /// Starts machine `i` (tap`i`, MAC 52:54:00:77:00:0`i+1`, so node id node-77000`i+1`).
    /// With `firmware_reboots`, a reboot goes back through the firmware (and PXE) instead
    /// of ending QEMU.
    pub fn boot_machine(&mut self, i: usize, firmware_reboots: bool) {
        let serial = self.dir.path().join(format!("node{i}.log"));
        let monitor = self.dir.path().join(format!("monitor{i}.sock"));
        let mut cmd = self.net.command("qemu-system-x86_64");
        cmd.args([
            "-accel", "tcg", "-m", "512", "-display", "none", "-boot", "n",
        ])
        .arg("-monitor")
        .arg(format!("unix:{},server,nowait", monitor.display()));
        if !firmware_reboots {
            cmd.arg("-no-reboot");
        }
        let vm = Proc(
            cmd.arg("-netdev")
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
        );
        while self.vms.len() <= i {
            self.vms.push(None);
        }
        self.vms[i] = Some(vm);
        self.serials.push(serial);
    }

    /// Presses machine `i`'s reset button (the firmware boots it again, by PXE).
    pub fn reset_machine(&self, i: usize) {
        use std::io::Write;
        let monitor = self.dir.path().join(format!("monitor{i}.sock"));
        let mut s = std::os::unix::net::UnixStream::connect(&monitor)
            .unwrap_or_else(|e| panic!("{}: {e}", monitor.display()));
        s.write_all(b"system_reset\n").unwrap();
        std::thread::sleep(Duration::from_millis(200));
    }

    /// Switches machine `i` off.
    pub fn kill_machine(&mut self, i: usize) {
        self.vms[i] = None;
    }

    /// `cellmaster ARGS --master BRIDGE_IP:7000` inside the namespace, with the admin
    /// bundle (or `--insecure`).
    pub fn cellmaster(&self, args: &[&str]) -> Output {
        self.cellmaster_command(args).output().unwrap()
    }

    pub fn cellmaster_command(&self, args: &[&str]) -> Command {
        let mut cmd = self.net.command(workspace_bin("cellmaster"));
        cmd.args(args)
            .args(["--master", &format!("{BRIDGE_IP}:7000")]);
        if self.secure {
            cmd.arg("--bundle")
                .arg(self.dir.path().join("admin.bundle"));
        } else {
            cmd.arg("--insecure");
        }
        cmd
    }

    /// A command's `--json` output; Null when it failed.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut args = args.to_vec();
        args.push("--json");
        let out = self.cellmaster(&args);
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    }

    /// Submits a job of `replicas` busybox httpd servers from the image's rootfs, with
    /// `extra` TOML after the resources table (e.g. a budget).
    pub fn submit_web(&self, replicas: u32, extra: &str) {
        let job = self.dir.path().join("web.toml");
        std::fs::write(
            &job,
            format!(
                "name = \"web\"\nreplicas = {replicas}\npriority = 100\n\
                 argv = [\"httpd\", \"-f\", \"-p\", \"8080\"]\nrootfs = \"/rootfs/busybox\"\n\
                 kill_grace_ms = 1000\n[resources]\nmemory = \"16MiB\"\ncpu_millis = 100\n{extra}"
            ),
        )
        .unwrap();
        let out = self.cellmaster(&["submit", job.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The nodes running a replica now, sorted, once each.
    pub fn running_on(&self) -> Vec<String> {
        let mut on: Vec<String> = self
            .tasks()
            .into_iter()
            .filter(|(_, state, _)| state == "running")
            .map(|(_, _, node)| node)
            .collect();
        on.sort();
        on.dedup();
        on
    }

    /// (id, state, node) of every task.
    pub fn tasks(&self) -> Vec<(String, String, String)> {
        let tasks = self.json(&["tasks"]);
        tasks
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|t| {
                        let s = |k: &str| t[k].as_str().unwrap_or_default().to_string();
                        (s("id"), s("state"), s("node"))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The master's log and every machine's console, for failure messages.
    pub fn consoles(&self) -> String {
        let mut s = format!(
            "master log:\n{}\n",
            std::fs::read_to_string(self.dir.path().join("master.log")).unwrap_or_default()
        );
        for serial in &self.serials {
            let text =
                String::from_utf8_lossy(&std::fs::read(serial).unwrap_or_default()).into_owned();
            let tail: Vec<&str> = text.lines().rev().take(80).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            s += &format!(
                "--- {} (last lines):\n{}\n",
                serial.display(),
                tail.join("\n")
            );
        }
        s
    }

    /// Polls `check` every second until it returns Some; fails after `secs` with `what`
    /// and the consoles.
    pub fn wait<T>(&self, what: &str, secs: u64, mut check: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(v) = check() {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within {secs} s\ntasks: {:?}\n{}",
                self.tasks(),
                self.consoles()
            );
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// Keeps the consoles under target/consoles/`name` for people to read.
    pub fn keep_consoles(&self, name: &str) {
        let dir = std::env::var_os("CELLD_CONSOLE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/consoles"));
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::write(dir.join(name), self.consoles());
    }
}

impl Drop for PxeCell {
    fn drop(&mut self) {
        self.vms.clear();
        drop(self.master.take());
    }
}

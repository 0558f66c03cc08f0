//! A cell on loopback for the integration tests: a real `cellmaster serve` with its
//! SQLite file, real `celld` daemons (root: cgroups and namespaces), the CLI as operators
//! run it, and each node's own task list read over gRPC to check what really runs.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use celld_proto::v1 as pb;
use serde_json::Value;

pub struct Proc(pub Child);

impl Proc {
    /// SIGTERM, then SIGKILL if it has not ended within `grace`.
    pub fn stop(mut self, grace: Duration) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn require_root() {
    let root = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        .unwrap_or(false);
    assert!(
        root,
        "celld needs root for its cgroups and namespaces: run this test as root"
    );
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

/// The credentials in a client bundle file.
pub fn bundle_credentials(path: &Path) -> celld_trust::Credentials {
    celld_trust::Bundle::read(path).unwrap().credentials()
}

pub struct Node {
    pub proc: Option<Proc>,
    pub address: String,
    pub cgroup_parent: String,
}

/// What a CLI run returned.
#[derive(Debug)]
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

pub struct Cell {
    pub dir: tempfile::TempDir,
    pub master: String,
    pub interval_ms: u64,
    master_proc: Option<Proc>,
    /// Extra arguments of `cellmaster serve`.
    pub serve_args: Vec<String>,
    pub nodes: BTreeMap<String, Node>,
    runtime: tokio::runtime::Runtime,
    /// Mutual TLS (the default); false runs both sides with --insecure.
    pub secure: bool,
    /// SHA-256 of the cell CA (celld --ca), and a join token good for many nodes.
    pub ca: String,
    pub token: String,
}

impl Cell {
    /// A master polling every `interval_ms`, no nodes yet.
    pub fn new(interval_ms: u64) -> Cell {
        Self::with(interval_ms, |_| {})
    }

    /// A master whose `serve` gets what `setup` adds to the cell first (a config file).
    pub fn with(interval_ms: u64, setup: impl FnOnce(&mut Cell)) -> Cell {
        require_root();
        let mut cell = Cell {
            dir: tempfile::tempdir().unwrap(),
            master: format!("127.0.0.1:{}", free_port()),
            interval_ms,
            master_proc: None,
            serve_args: Vec::new(),
            nodes: BTreeMap::new(),
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            secure: true,
            ca: String::new(),
            token: String::new(),
        };
        setup(&mut cell);
        if cell.secure {
            // admin-cert makes the CA beside the store, as the master would at start.
            let out = Command::new(env!("CARGO_BIN_EXE_cellmaster"))
                .args(["admin-cert", "--role", "admin", "--out"])
                .arg(cell.bundle())
                .arg("--state")
                .arg(cell.state_file())
                .output()
                .unwrap();
            assert!(out.status.success(), "admin-cert: {out:?}");
            let pem = std::fs::read_to_string(cell.dir.path().join("ca.crt")).unwrap();
            let ca = celld_trust::ca::pem_certificates(&pem).unwrap();
            cell.ca = celld_trust::fingerprint(&ca[0]);
        }
        cell.start_master();
        if cell.secure {
            let out = cell.cli(&["token", "create", "--ttl", "1h", "--uses", "1000"]);
            assert_eq!(out.code, 0, "token create: {out:?}");
            cell.token = out.stdout.trim().to_string();
        }
        cell
    }

    /// The admin's client bundle.
    pub fn bundle(&self) -> PathBuf {
        self.dir.path().join("admin.bundle")
    }

    /// The credentials in the admin's bundle.
    pub fn admin_credentials(&self) -> celld_trust::Credentials {
        bundle_credentials(&self.bundle())
    }

    /// A client of `name`'s celld, with `creds` (None: the admin's; insecure cells: plain).
    pub async fn node_client_as(
        &self,
        name: &str,
        creds: Option<&celld_trust::Credentials>,
    ) -> Result<pb::node_client::NodeClient<tonic::transport::Channel>, String> {
        let node = &self.nodes[name];
        let endpoint = celld_trust::client::endpoint(&node.address, Duration::from_secs(3))?;
        let tls = if self.secure {
            let creds = creds.cloned().unwrap_or_else(|| self.admin_credentials());
            let config = std::sync::Arc::new(creds.client_config()?);
            Some(celld_trust::ClientTls::new(config, name)?)
        } else {
            None
        };
        let channel = celld_trust::client::connect(endpoint, tls.as_ref())
            .await
            .map_err(|e| format!("{e:?}"))?;
        Ok(pb::node_client::NodeClient::new(channel))
    }

    pub fn state_file(&self) -> PathBuf {
        self.dir.path().join("state.db")
    }

    /// Starts (or restarts) the master on the same address and state file.
    pub fn start_master(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("master.log"))
            .unwrap();
        self.master_proc = Some(Proc(
            Command::new(env!("CARGO_BIN_EXE_cellmaster"))
                .args(["serve", "--listen", &self.master])
                .arg("--state")
                .arg(self.state_file())
                .args(["--poll-interval-ms", &self.interval_ms.to_string()])
                .args(if self.secure {
                    vec![]
                } else {
                    vec!["--insecure"]
                })
                .args(&self.serve_args)
                .stderr(log)
                .spawn()
                .unwrap(),
        ));
        let up = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&self.master).is_err() {
            assert!(Instant::now() < up, "cellmaster did not start listening");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `kill -9` of the master.
    pub fn kill_master(&mut self) {
        drop(self.master_proc.take());
    }

    pub fn add_node(&mut self, name: &str) {
        self.add_node_on(name, free_port(), true);
    }

    /// A node on `port`; with `register`, it is told where the master is.
    pub fn add_node_on(&mut self, name: &str, port: u16, register: bool) {
        let address = format!("127.0.0.1:{port}");
        let cgroup_parent = format!("celld-mt-{name}-{port}");
        let log = std::fs::File::create(self.dir.path().join(format!("{name}.log"))).unwrap();
        let proc = Proc(
            Command::new(celld())
                .args(["--listen", &address])
                .args(if register {
                    vec!["--master", &self.master]
                } else {
                    vec![]
                })
                .args(["--hostname", name])
                .args(if self.secure {
                    vec!["--ca", &self.ca, "--join", &self.token]
                } else {
                    vec!["--insecure"]
                })
                .args(["--cgroup-parent", &cgroup_parent])
                .arg("--state-dir")
                .arg(self.dir.path().join(name))
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
        self.nodes.insert(
            name.to_string(),
            Node {
                proc: Some(proc),
                address,
                cgroup_parent,
            },
        );
    }

    /// `kill -9` of a node's celld; its tasks are orphaned (reaped at the end).
    pub fn kill_node(&mut self, name: &str) {
        let node = self.nodes.get_mut(name).unwrap();
        drop(node.proc.take());
        kill_cgroup_tree(&node.cgroup_parent);
    }

    /// SIGSTOP (`true`) or SIGCONT a node's celld: a hung node whose tasks go on running,
    /// as on the far side of a network partition.
    pub fn pause_node(&self, name: &str, paused: bool) {
        let node = &self.nodes[name];
        let pid = node.proc.as_ref().unwrap().0.id() as i32;
        let signal = if paused {
            nix::sys::signal::Signal::SIGSTOP
        } else {
            nix::sys::signal::Signal::SIGCONT
        };
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).unwrap();
    }

    /// The CLI pointed at this cell's master, with the admin bundle (or `--insecure`).
    pub fn cli_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cellmaster"));
        cmd.args(args).args(["--master", &self.master]);
        if self.secure {
            cmd.arg("--bundle").arg(self.bundle());
        } else {
            cmd.arg("--insecure");
        }
        cmd
    }

    pub fn cli(&self, args: &[&str]) -> Out {
        let out = self.cli_command(args).output().unwrap();
        Out {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into(),
            stderr: String::from_utf8_lossy(&out.stderr).into(),
        }
    }

    /// A command that must succeed, its `--json` output parsed.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.push("--json");
        let out = self.cli(&args);
        assert_eq!(out.code, 0, "{args:?}: {out:?}\n{}", self.log());
        serde_json::from_str(&out.stdout).unwrap()
    }

    pub fn log(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("master.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        format!("master log (last lines):\n{}", tail.join("\n"))
    }

    /// Polls `check` every 100 ms until it returns Some, or fails after `secs` with `what`
    /// and the master's log.
    pub fn wait<T>(&self, what: &str, secs: u64, mut check: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(v) = check() {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within {secs} s\ntasks: {:#}\n{}",
                self.json(&["tasks"]),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn wait_ready(&self, names: &[&str]) {
        self.wait("nodes ready", 30, || {
            let nodes = self.json(&["nodes"]);
            let ready = names.iter().all(|n| {
                nodes
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|x| x["id"] == *n && x["liveness"] == "READY")
            });
            ready.then_some(())
        });
    }

    /// Task id -> (state, node) as the master sees it.
    pub fn tasks(&self) -> BTreeMap<String, (String, String)> {
        self.json(&["tasks"])
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                (
                    t["id"].as_str().unwrap().to_string(),
                    (
                        t["state"].as_str().unwrap().to_string(),
                        t["node"].as_str().unwrap().to_string(),
                    ),
                )
            })
            .collect()
    }

    /// The tasks a node itself runs (RUNNING or starting), by their id on the node.
    pub fn running_on(&self, name: &str) -> Vec<String> {
        let node = &self.nodes[name];
        if node.proc.is_none() {
            return Vec::new();
        }
        self.runtime.block_on(async {
            let Ok(mut c) = self.node_client_as(name, None).await else {
                return Vec::new();
            };
            let tasks = c
                .list_tasks(pb::ListTasksRequest::default())
                .await
                .map(|r| r.into_inner().tasks)
                .unwrap_or_default();
            tasks
                .into_iter()
                .filter(|t| {
                    [
                        pb::TaskState::Pending,
                        pb::TaskState::Starting,
                        pb::TaskState::Running,
                    ]
                    .iter()
                    .any(|s| *s as i32 == t.state)
                })
                .map(|t| t.id)
                .collect()
        })
    }

    /// Every master task runs at most once in the whole cell (attempt ids stripped).
    pub fn assert_no_duplicates(&self) {
        let mut seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for name in self.nodes.keys() {
            for id in self.running_on(name) {
                let task = id
                    .rsplit_once('-')
                    .map_or(id.clone(), |(t, _)| t.to_string());
                seen.entry(task).or_default().push(format!("{name}:{id}"));
            }
        }
        for (task, copies) in &seen {
            assert!(
                copies.len() <= 1,
                "{task} runs {} times: {copies:?}",
                copies.len()
            );
        }
    }

    /// A root filesystem with busybox, for the tasks of test jobs.
    pub fn rootfs(&self) -> PathBuf {
        let rootfs = self.dir.path().join("rootfs");
        if !rootfs.exists() {
            for d in ["bin", "proc", "dev", "sys", "tmp"] {
                std::fs::create_dir_all(rootfs.join(d)).unwrap();
            }
            std::fs::copy("/bin/busybox", rootfs.join("bin/busybox"))
                .expect("/bin/busybox: apt-get install -y busybox-static");
            for tool in ["sleep", "sh", "echo"] {
                std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(tool)).unwrap();
            }
        }
        rootfs
    }

    /// Writes a job file (`body` after the name, rootfs and a sleeping argv) and submits it.
    pub fn submit(&self, name: &str, body: &str) -> Out {
        self.submit_text(
            name,
            &format!(
                "name = \"{name}\"\nargv = [\"sleep\", \"600\"]\nrootfs = {:?}\nkill_grace_ms = 500\n{body}",
                self.rootfs().display().to_string()
            ),
        )
    }

    /// Submits `text` as the job file `<file>.toml`.
    pub fn submit_text(&self, file: &str, text: &str) -> Out {
        let path = self.dir.path().join(format!("{file}.toml"));
        std::fs::write(&path, text).unwrap();
        self.cli(&["submit", path.to_str().unwrap()])
    }
}

impl Drop for Cell {
    fn drop(&mut self) {
        drop(self.master_proc.take());
        for node in self.nodes.values_mut() {
            if let Some(p) = node.proc.take() {
                let pid = nix::unistd::Pid::from_raw(p.0.id() as i32);
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
                p.stop(Duration::from_secs(10));
            }
            kill_cgroup_tree(&node.cgroup_parent);
        }
    }
}

/// Kills every process below `parent` in every cgroup hierarchy and removes the groups
/// (a celld killed with -9 leaves its tasks behind).
pub fn kill_cgroup_tree(parent: &str) {
    let Ok(roots) = std::fs::read_dir("/sys/fs/cgroup") else {
        return;
    };
    let mut tops: Vec<PathBuf> = vec![Path::new("/sys/fs/cgroup").join(parent)];
    for r in roots.flatten() {
        tops.push(r.path().join(parent));
    }
    for top in tops.iter().filter(|t| t.is_dir()) {
        let mut dirs = Vec::new();
        collect_dirs(top, &mut dirs);
        for d in &dirs {
            let procs = std::fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.lines().filter_map(|p| p.parse::<i32>().ok()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        std::thread::sleep(Duration::from_millis(100));
        for d in dirs.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_path_buf());
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                collect_dirs(&e.path(), out);
            }
        }
    }
}

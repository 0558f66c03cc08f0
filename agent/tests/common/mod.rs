//! Test harness: a real `celld` daemon on loopback, a busybox rootfs with the hostile
//! probe in it, and a gRPC client. These tests need root; without it they fail and say so.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use celld_proto::v1 as pb;
use celld_proto::v1::node_client::NodeClient;
use tonic::transport::Channel;

pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test drives real namespaces and cgroups and needs root; run it as root \
         (CI does) instead of skipping it"
    );
}

/// A busybox rootfs (plus celld-probe and the libraries it links) in `dir`.
pub fn busybox_rootfs(dir: &Path) -> PathBuf {
    let busybox = Path::new("/bin/busybox");
    assert!(
        busybox.exists(),
        "/bin/busybox is missing: apt-get install -y busybox-static"
    );
    let root = dir.join("rootfs");
    for d in ["bin", "proc", "dev", "sys", "tmp", "etc", "root"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy(busybox, root.join("bin/busybox")).unwrap();
    let list = Command::new(busybox).arg("--list").output().unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(applet));
    }
    let probe = PathBuf::from(env!("CARGO_BIN_EXE_celld-probe"));
    std::fs::copy(&probe, root.join("bin/celld-probe")).unwrap();
    copy_libraries(&probe, &root);
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    root
}

/// Copies what `ldd` says a dynamic binary needs into the rootfs at the same paths.
fn copy_libraries(bin: &Path, root: &Path) {
    let out = Command::new("ldd").arg(bin).output().unwrap();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let path = line
            .split_whitespace()
            .find(|w| w.starts_with('/'))
            .map(PathBuf::from);
        if let Some(p) = path {
            let dest = root.join(p.strip_prefix("/").unwrap());
            std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
            std::fs::copy(&p, &dest).unwrap();
        }
    }
}

pub struct Node {
    child: Child,
    pub addr: String,
    pub client: NodeClient<Channel>,
    pub dir: tempfile::TempDir,
    pub rootfs: PathBuf,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Node {
    pub async fn start() -> Node {
        Self::start_with(&[]).await
    }

    pub async fn start_with(extra: &[&str]) -> Node {
        require_root();
        let dir = tempfile::tempdir().unwrap();
        let rootfs = busybox_rootfs(dir.path());
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let cgroup = format!("celld-test-{}-{port}", std::process::id());
        let log = std::fs::File::create(dir.path().join("celld.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_celld"))
            .args(["--listen", &addr, "--cgroup-parent", &cgroup, "--insecure"])
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let client = loop {
            match NodeClient::connect(format!("http://{addr}")).await {
                Ok(c) => break c,
                Err(e) if Instant::now() > deadline => panic!("celld did not come up: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        Node {
            child,
            addr,
            client,
            dir,
            rootfs,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("celld.log")).unwrap_or_default()
    }

    /// A task of `argv` in the busybox rootfs with modest limits and a short grace.
    pub fn spec(&self, id: &str, argv: &[&str]) -> pb::TaskSpec {
        pb::TaskSpec {
            id: id.into(),
            job: "test".into(),
            argv: argv.iter().map(|s| s.to_string()).collect(),
            rootfs: self.rootfs.to_string_lossy().into(),
            resources: Some(pb::Resources {
                memory_bytes: 64 << 20,
                cpu_millis: 500,
                pids_max: 64,
            }),
            kill_grace_ms: 2000,
            ..Default::default()
        }
    }

    pub async fn run(&mut self, spec: pb::TaskSpec) -> pb::TaskStatus {
        self.client
            .run_task(pb::RunTaskRequest { spec: Some(spec) })
            .await
            .unwrap()
            .into_inner()
            .task
            .unwrap()
    }

    pub async fn task(&mut self, id: &str) -> pb::TaskStatus {
        let all = self
            .client
            .list_tasks(pb::ListTasksRequest::default())
            .await
            .unwrap()
            .into_inner()
            .tasks;
        all.into_iter()
            .find(|t| t.id == id)
            .unwrap_or_else(|| panic!("no task {id}"))
    }

    pub async fn status(&mut self) -> pb::NodeStatus {
        self.client
            .get_status(pb::GetStatusRequest::default())
            .await
            .unwrap()
            .into_inner()
    }

    pub async fn kill(
        &mut self,
        id: &str,
        grace_ms: u32,
    ) -> Result<pb::KillTaskResponse, tonic::Status> {
        self.client
            .kill_task(pb::KillTaskRequest {
                id: id.into(),
                grace_ms,
            })
            .await
            .map(|r| r.into_inner())
    }

    /// Polls until `pred` holds for the task; fails with its last status otherwise.
    pub async fn wait_for(
        &mut self,
        id: &str,
        timeout: Duration,
        pred: impl Fn(&pb::TaskStatus) -> bool,
    ) -> pb::TaskStatus {
        let deadline = Instant::now() + timeout;
        loop {
            let t = self.task(id).await;
            if pred(&t) {
                return t;
            }
            if Instant::now() > deadline {
                panic!(
                    "task {id} did not reach the expected state: {t:#?}\ncelld log:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn wait_finished(&mut self, id: &str) -> pb::TaskStatus {
        self.wait_for(id, Duration::from_secs(30), |t| {
            t.state == pb::TaskState::Dead as i32 || t.state == pb::TaskState::Evicted as i32
        })
        .await
    }

    pub async fn wait_running(&mut self, id: &str) -> pb::TaskStatus {
        self.wait_for(id, Duration::from_secs(30), |t| {
            t.state == pb::TaskState::Running as i32
        })
        .await
    }

    /// Everything the task printed so far, stdout and stderr, in order.
    pub async fn logs(&mut self, id: &str) -> Vec<pb::LogLine> {
        let mut stream = self
            .client
            .task_logs(pb::TaskLogsRequest {
                id: id.into(),
                follow: false,
                tail: 0,
            })
            .await
            .unwrap()
            .into_inner();
        let mut out = Vec::new();
        while let Some(l) = stream.message().await.unwrap() {
            out.push(l);
        }
        out
    }

    pub async fn output(&mut self, id: &str) -> String {
        self.logs(id)
            .await
            .iter()
            .map(|l| String::from_utf8_lossy(&l.line).into_owned() + "\n")
            .collect()
    }

    /// Runs a task to its end and returns (status, output).
    pub async fn run_to_end(&mut self, spec: pb::TaskSpec) -> (pb::TaskStatus, String) {
        let id = spec.id.clone();
        self.run(spec).await;
        let t = self.wait_finished(&id).await;
        // Output pipes drain a moment after the exit is seen.
        tokio::time::sleep(Duration::from_millis(100)).await;
        (t, self.output(&id).await)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn state(t: &pb::TaskStatus) -> pb::TaskState {
    pb::TaskState::try_from(t.state).unwrap()
}

pub fn reason(t: &pb::TaskStatus) -> pb::TaskReason {
    pb::TaskReason::try_from(t.reason).unwrap()
}

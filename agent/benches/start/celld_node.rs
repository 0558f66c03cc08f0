//! The celld side: a daemon this program starts on loopback, driven over gRPC, with every
//! task transition timed from its `WatchTasks` stream as this client receives it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use celld_proto::v1 as pb;
use celld_proto::v1::node_client::NodeClient;
use tokio::sync::mpsc as async_mpsc;
use tonic::transport::Channel;

use crate::{CPU_MILLIS, MEMORY_BYTES, PIDS_MAX, Result, status_kib};

/// 100 tasks of 500 millis do not fit a 2-core node, so the RSS tasks ask for less CPU.
pub const RSS_TASK_CPU_MILLIS: u64 = 10;
const EVENT_TIMEOUT: Duration = Duration::from_secs(30);

/// A celld daemon started by this program; stopped with SIGTERM when dropped.
pub struct Celld {
    child: Child,
    pub binary: PathBuf,
    log: PathBuf,
    client: NodeClient<Channel>,
}

/// Memory and descriptors of the daemon process, from /proc/PID.
#[derive(Clone, Copy)]
pub struct Footprint {
    pub rss_kib: u64,
    /// Peak RSS so far (VmHWM).
    pub hwm_kib: u64,
    pub fds: usize,
}

/// What the node said about itself, for the notes.
pub struct CelldFacts {
    pub cgroup_version: String,
    pub landlock_abi: u32,
}

/// One start, as the client saw it (times from the RunTask call).
#[derive(Clone, Copy)]
pub struct CelldStart {
    pub reply: Duration,
    pub running: Duration,
    pub dead: Duration,
    /// The node's own transition times (milliseconds): PENDING to RUNNING, RUNNING to DEAD.
    pub server_pending_to_running_ms: i64,
    pub server_running_to_dead_ms: i64,
}

pub type Events = async_mpsc::UnboundedReceiver<Result<(Instant, pb::TaskStatus)>>;

impl Celld {
    pub async fn start(work: &Path, cgroup_parent: &str) -> Result<Celld> {
        let binary = PathBuf::from(env!("CARGO_BIN_EXE_celld"));
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("finding a free port: {e}"))?
            .port();
        let addr = format!("127.0.0.1:{port}");
        let dir = work.join(cgroup_parent);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let log = dir.join("celld.log");
        let log_file =
            std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let child = Command::new(&binary)
            .args([
                "--listen",
                &addr,
                "--cgroup-parent",
                cgroup_parent,
                "--insecure",
            ])
            .arg("--state-dir")
            .arg(dir.join("state"))
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", binary.display()))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        let client = loop {
            match NodeClient::connect(format!("http://{addr}")).await {
                Ok(c) => break c,
                Err(e) if Instant::now() > deadline => {
                    let log = std::fs::read_to_string(&log).unwrap_or_default();
                    return Err(format!("celld did not come up on {addr}: {e}\n{log}"));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        Ok(Celld {
            child,
            binary,
            log,
            client,
        })
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// What the daemon process holds right now.
    pub fn footprint(&self) -> Result<Footprint> {
        let pid = self.child.id();
        let path = format!("/proc/{pid}/status");
        let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
        let (Some(rss_kib), Some(hwm_kib)) =
            (status_kib(&text, "VmRSS:"), status_kib(&text, "VmHWM:"))
        else {
            return Err(format!("{path} has no VmRSS/VmHWM line"));
        };
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map_err(|e| format!("/proc/{pid}/fd: {e}"))?
            .count();
        Ok(Footprint {
            rss_kib,
            hwm_kib,
            fds,
        })
    }

    pub async fn facts(&mut self) -> Result<CelldFacts> {
        let status = self
            .client
            .get_status(pb::GetStatusRequest::default())
            .await
            .map_err(|e| format!("GetStatus: {e}"))?
            .into_inner();
        Ok(CelldFacts {
            cgroup_version: status.cgroup_version,
            landlock_abi: status.landlock_abi,
        })
    }

    /// Every task transition, stamped when this client received it.
    pub async fn watch(&mut self) -> Result<Events> {
        let mut stream = self
            .client
            .watch_tasks(pb::WatchTasksRequest {
                initial_state: false,
            })
            .await
            .map_err(|e| format!("WatchTasks: {e}"))?
            .into_inner();
        let (tx, rx) = async_mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let event = match stream.message().await {
                    Ok(Some(e)) => e,
                    Ok(None) => {
                        let _ = tx.send(Err("WatchTasks stream ended".to_string()));
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(format!("WatchTasks stream: {e}")));
                        return;
                    }
                };
                let at = Instant::now();
                if let Some(task) = event.task
                    && tx.send(Ok((at, task))).is_err()
                {
                    return;
                }
            }
        });
        Ok(rx)
    }

    fn spec(rootfs: &Path, id: &str, argv: &[&str], cpu_millis: u64) -> pb::TaskSpec {
        pb::TaskSpec {
            id: id.into(),
            job: "bench".into(),
            argv: argv.iter().map(|s| s.to_string()).collect(),
            rootfs: rootfs.to_string_lossy().into(),
            resources: Some(pb::Resources {
                memory_bytes: MEMORY_BYTES,
                cpu_millis,
                pids_max: PIDS_MAX,
            }),
            kill_grace_ms: 1000,
            ..Default::default()
        }
    }

    async fn run_task(&mut self, spec: pb::TaskSpec) -> Result<()> {
        let id = spec.id.clone();
        self.client
            .run_task(pb::RunTaskRequest { spec: Some(spec) })
            .await
            .map_err(|e| format!("RunTask {id}: {e}"))?;
        Ok(())
    }

    /// Waits for `id` to reach `state`; the time this client saw it.
    async fn wait_state(
        &self,
        events: &mut Events,
        id: &str,
        state: pb::TaskState,
    ) -> Result<(Instant, pb::TaskStatus)> {
        loop {
            let (at, task) = tokio::time::timeout(EVENT_TIMEOUT, events.recv())
                .await
                .map_err(|_| {
                    format!(
                        "task {id} did not reach {state:?} in {EVENT_TIMEOUT:?}\ncelld log:\n{}",
                        self.log_text()
                    )
                })?
                .ok_or("WatchTasks reader stopped")??;
            if task.id != id {
                continue;
            }
            if task.state == state as i32 {
                return Ok((at, task));
            }
            let finished = task.state == pb::TaskState::Dead as i32
                || task.state == pb::TaskState::Evicted as i32;
            if finished {
                return Err(format!(
                    "task {id} ended before reaching {state:?}: {task:?}\ncelld log:\n{}",
                    self.log_text()
                ));
            }
        }
    }

    /// RunTask of `/bin/true` until the client sees RUNNING and then DEAD.
    pub async fn start_once(
        &mut self,
        events: &mut Events,
        rootfs: &Path,
        id: &str,
    ) -> Result<CelldStart> {
        let spec = Self::spec(rootfs, id, &["/bin/true"], CPU_MILLIS);
        let t0 = Instant::now();
        self.run_task(spec).await?;
        let reply = t0.elapsed();
        let (running_at, _) = self.wait_state(events, id, pb::TaskState::Running).await?;
        let (dead_at, dead) = self.wait_state(events, id, pb::TaskState::Dead).await?;
        if dead.reason != pb::TaskReason::Exited as i32 || dead.exit_code != 0 {
            return Err(format!(
                "task {id} did not exit cleanly: {dead:?}\ncelld log:\n{}",
                self.log_text()
            ));
        }
        let at = |s: pb::TaskState| {
            dead.transitions
                .iter()
                .find(|t| t.state == s as i32)
                .map(|t| t.at_unix_ms)
                .ok_or_else(|| format!("task {id} has no {s:?} transition: {dead:?}"))
        };
        let (pending, running, died) = (
            at(pb::TaskState::Pending)?,
            at(pb::TaskState::Running)?,
            at(pb::TaskState::Dead)?,
        );
        Ok(CelldStart {
            reply,
            running: running_at.saturating_duration_since(t0),
            dead: dead_at.saturating_duration_since(t0),
            server_pending_to_running_ms: running - pending,
            server_running_to_dead_ms: died - running,
        })
    }
}

impl Drop for Celld {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The daemon's footprint at each point of interest.
pub struct RssReport {
    pub idle: Footprint,
    pub running: Footprint,
    pub running_tasks: usize,
}

/// A fresh daemon: RSS when idle, then with `count` tasks of `sleep 600` running.
pub async fn measure_rss(work: &Path, rootfs: &Path, tag: u32, count: usize) -> Result<RssReport> {
    let mut celld = Celld::start(work, &format!("celld-bench-{tag}-rss")).await?;
    celld.facts().await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = celld.footprint()?;
    let mut events = celld.watch().await?;
    let ids: Vec<String> = (0..count).map(|i| format!("s{tag}-{i}")).collect();
    for id in &ids {
        let spec = Celld::spec(rootfs, id, &["sleep", "600"], RSS_TASK_CPU_MILLIS);
        celld.run_task(spec).await?;
    }
    let mut waiting: std::collections::HashSet<&str> = ids.iter().map(|s| s.as_str()).collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !waiting.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        let (_, task) = tokio::time::timeout(left, events.recv())
            .await
            .map_err(|_| format!("{} sleep tasks did not start in 120 s", waiting.len()))?
            .ok_or("WatchTasks reader stopped")??;
        if task.state == pb::TaskState::Running as i32 {
            waiting.remove(task.id.as_str());
        } else if task.state == pb::TaskState::Dead as i32 {
            return Err(format!(
                "sleep task {} died: {task:?}\ncelld log:\n{}",
                task.id,
                celld.log_text()
            ));
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let running = celld.footprint()?;
    for id in &ids {
        celld
            .client
            .kill_task(pb::KillTaskRequest {
                id: id.clone(),
                grace_ms: 100,
            })
            .await
            .map_err(|e| format!("KillTask {id}: {e}"))?;
    }
    Ok(RssReport {
        idle,
        running,
        running_tasks: count,
    })
}

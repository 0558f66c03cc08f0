//! The simulated fleet: one process serving `celld.v1.Node` on one loopback address per
//! node, so the master's CPU and memory are measured without the servers in them.
//!
//! Every node answers `GetStatus` with the same realistic status of 100 tasks (built
//! once, cloned when a full reply is due) or with "unchanged" when the master already has
//! the node's generation. Each node's generation moves once per `change_every`, staggered
//! across the fleet, so at one poll per second about one reply in `change_every` seconds
//! is full. On `silence 12:hung,345:closed` (stdin) the named nodes go quiet: a hung node
//! keeps its connection and never answers, a closed one shuts its listener and
//! connections. One process serves a shard of the fleet (`first`, `count`) because each
//! node costs two descriptors here and the container caps them at 20,000. Nothing here
//! is measured; the driver reads these processes' CPU only to show they were not the
//! bottleneck.

use std::io::{BufRead, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use celld_proto::v1 as pb;
use celld_proto::v1::node_server::{Node, NodeServer};
use tokio::time::Instant;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

use crate::{Result, node_address, unix_micros};

pub struct SimArgs {
    pub first: usize,
    pub count: usize,
    /// Nodes in the whole fleet, for the stagger of generation changes.
    pub fleet: usize,
    pub change_every: Duration,
    /// Mutual TLS: each node serves a certificate for its node id from this CA.
    pub ca: Option<celld_trust::CellCa>,
}

/// What one simulated node knows: its place in the fleet (for the stagger) and whether
/// it has been told to hang.
struct SimNode {
    index: usize,
    nodes: usize,
    change_every: Duration,
    started: Instant,
    status: Arc<pb::NodeStatus>,
    hung: AtomicBool,
}

impl SimNode {
    fn generation(&self) -> u64 {
        let period = self.change_every.as_millis().max(1) as u64;
        let offset = self.index as u64 * period / self.nodes.max(1) as u64;
        1 + (self.started.elapsed().as_millis() as u64 + offset) / period
    }
}

type BoxStream<T> =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = std::result::Result<T, Status>> + Send>>;

#[derive(Clone)]
struct SimService(Arc<SimNode>);

fn unimplemented<T>() -> std::result::Result<Response<T>, Status> {
    Err(Status::unimplemented(
        "the simulated node only answers GetStatus",
    ))
}

#[tonic::async_trait]
impl Node for SimService {
    async fn get_status(
        &self,
        req: Request<pb::GetStatusRequest>,
    ) -> std::result::Result<Response<pb::NodeStatus>, Status> {
        if self.0.hung.load(Ordering::Relaxed) {
            // A hung node: the connection stays up and the call never ends.
            std::future::pending::<()>().await;
        }
        let known = req.into_inner().if_generation_differs_from;
        let generation = self.0.generation();
        if known == generation {
            return Ok(Response::new(pb::NodeStatus {
                generation,
                unchanged: true,
                ..Default::default()
            }));
        }
        let mut status = (*self.0.status).clone();
        status.generation = generation;
        Ok(Response::new(status))
    }
    async fn run_task(
        &self,
        _: Request<pb::RunTaskRequest>,
    ) -> std::result::Result<Response<pb::RunTaskResponse>, Status> {
        unimplemented()
    }
    async fn kill_task(
        &self,
        _: Request<pb::KillTaskRequest>,
    ) -> std::result::Result<Response<pb::KillTaskResponse>, Status> {
        unimplemented()
    }
    async fn list_tasks(
        &self,
        _: Request<pb::ListTasksRequest>,
    ) -> std::result::Result<Response<pb::ListTasksResponse>, Status> {
        unimplemented()
    }
    type WatchTasksStream = BoxStream<pb::TaskEvent>;
    async fn watch_tasks(
        &self,
        _: Request<pb::WatchTasksRequest>,
    ) -> std::result::Result<Response<Self::WatchTasksStream>, Status> {
        unimplemented()
    }
    type TaskLogsStream = BoxStream<pb::LogLine>;
    async fn task_logs(
        &self,
        _: Request<pb::TaskLogsRequest>,
    ) -> std::result::Result<Response<Self::TaskLogsStream>, Status> {
        unimplemented()
    }
    async fn cordon(
        &self,
        _: Request<pb::CordonRequest>,
    ) -> std::result::Result<Response<pb::CordonResponse>, Status> {
        unimplemented()
    }
    async fn uncordon(
        &self,
        _: Request<pb::UncordonRequest>,
    ) -> std::result::Result<Response<pb::UncordonResponse>, Status> {
        unimplemented()
    }
    async fn drain(
        &self,
        _: Request<pb::DrainRequest>,
    ) -> std::result::Result<Response<pb::DrainResponse>, Status> {
        unimplemented()
    }
    async fn apply_sysctls(
        &self,
        _: Request<pb::ApplySysctlsRequest>,
    ) -> std::result::Result<Response<pb::ApplySysctlsResponse>, Status> {
        unimplemented()
    }
    async fn reimage(
        &self,
        _: Request<pb::ReimageRequest>,
    ) -> std::result::Result<Response<pb::ReimageResponse>, Status> {
        unimplemented()
    }
    async fn reboot(
        &self,
        _: Request<pb::RebootRequest>,
    ) -> std::result::Result<Response<pb::RebootResponse>, Status> {
        unimplemented()
    }
    async fn poweroff(
        &self,
        _: Request<pb::PoweroffRequest>,
    ) -> std::result::Result<Response<pb::PoweroffResponse>, Status> {
        unimplemented()
    }
}

/// A status like a busy node's: 100 running tasks of 10 jobs, each with three
/// transitions, usage and resources filled in, plus identity, conditions and sysctls.
pub fn realistic_status() -> pb::NodeStatus {
    let ms = 1_790_000_000_000i64;
    let tasks = (0..100u32)
        .map(|t| {
            let job = format!("job-{:02}", t % 10);
            let transitions = [
                (pb::TaskState::Pending, "accepted"),
                (pb::TaskState::Starting, "rootfs mounted, cgroup created"),
                (pb::TaskState::Running, "exec /usr/bin/server"),
            ]
            .iter()
            .enumerate()
            .map(|(k, (state, message))| pb::Transition {
                state: *state as i32,
                reason: 0,
                at_unix_ms: ms + i64::from(t) * 1000 + k as i64 * 37,
                message: (*message).to_string(),
            })
            .collect();
            pb::TaskStatus {
                id: format!("{job}-replica-{t:03}"),
                job,
                state: pb::TaskState::Running as i32,
                reason: 0,
                exit_code: -1,
                signal: 0,
                message: String::new(),
                pid: 10_000 + t,
                restarts: t % 3,
                priority: 100 + (t % 5) as i32 * 100,
                transitions,
                usage: Some(pb::TaskUsage {
                    memory_bytes: 120 << 20,
                    memory_peak_bytes: 180 << 20,
                    cpu_usec: 987_654_321 + u64::from(t),
                    oom_kills: 0,
                    pids: 12,
                }),
                resources: Some(pb::Resources {
                    memory_bytes: 256 << 20,
                    cpu_millis: 250,
                    pids_max: 128,
                }),
                landlock_abi: 3,
                healthy: true,
            }
        })
        .collect();
    let conditions = ["Ready", "MemoryPressure", "PIDPressure", "DiskPressure"]
        .iter()
        .map(|t| pb::Condition {
            r#type: (*t).to_string(),
            status: *t == "Ready",
            reason: "KubeletLikeHeartbeat".to_string(),
            since_unix_ms: ms,
        })
        .collect();
    let sysctls = ["net.core.somaxconn", "vm.max_map_count", "kernel.pid_max"]
        .iter()
        .map(|k| pb::SysctlResult {
            key: (*k).to_string(),
            wanted: "65536".to_string(),
            actual: "65536".to_string(),
            error: String::new(),
        })
        .collect();
    let pressure = Some(pb::Pressure {
        some_avg10: 0.42,
        full_avg10: 0.1,
    });
    pb::NodeStatus {
        generation: 1,
        identity: Some(pb::NodeIdentity {
            machine_id: "5f3c9a0e8b7d4c2a9e1f0b6d3c8a7e52".to_string(),
            hostname: "rack12-node34".to_string(),
            macs: vec!["52:54:00:12:34:56".to_string()],
            addresses: vec!["10.12.34.56".to_string()],
        }),
        boot_id: "0e4c2f7a-91b3-4d8e-a6f5-3b2c1d0e9f87".to_string(),
        image_version: "2026.11.3".to_string(),
        celld_version: "0.1.0".to_string(),
        kernel_release: "6.1.0-27-amd64".to_string(),
        uptime_seconds: 864_000.5,
        boot_to_ready_seconds: 1.9,
        capacity: Some(pb::Resources {
            memory_bytes: 64 << 30,
            cpu_millis: 32_000,
            pids_max: 4_194_304,
        }),
        allocatable: Some(pb::Resources {
            memory_bytes: 62 << 30,
            cpu_millis: 31_000,
            pids_max: 4_000_000,
        }),
        usage: Some(pb::NodeUsage {
            memory_used_bytes: 13 << 30,
            memory_available_bytes: 49 << 30,
            load1: 7.5,
            load5: 7.1,
            load15: 6.8,
            cpu_busy_usec: 123_456_789_012,
            processes: 1432,
            cpu_pressure: pressure,
            memory_pressure: pressure,
            io_pressure: pressure,
            disk_free_bytes: 400 << 30,
        }),
        conditions,
        cordoned: false,
        draining: false,
        sysctls,
        tasks,
        landlock_abi: 3,
        mode: "pid1".to_string(),
        cgroup_version: "v2".to_string(),
        config_errors: Vec::new(),
        unchanged: false,
        init_to_ready_seconds: 0.3,
        last_reimage_error: String::new(),
        reimage_in_progress: false,
    }
}

pub async fn serve_fleet(args: SimArgs) -> Result<()> {
    let status = Arc::new(realistic_status());
    let started = Instant::now();
    let mut nodes = Vec::with_capacity(args.count);
    let mut stops = Vec::with_capacity(args.count);
    for index in args.first..args.first + args.count {
        let address = node_address(index);
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .map_err(|e| format!("simulated node {index}: bind {address}: {e}"))?;
        let node = Arc::new(SimNode {
            index,
            nodes: args.fleet,
            change_every: args.change_every,
            started,
            status: status.clone(),
            hung: AtomicBool::new(false),
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let service = NodeServer::new(SimService(node.clone()));
        let tls = match &args.ca {
            Some(ca) => Some(node_tls(ca, index)?),
            None => None,
        };
        tokio::spawn(async move {
            let server = tonic::transport::Server::builder().add_service(service);
            let stopped = async {
                let _ = stopped.await;
            };
            let _ = match tls {
                None => {
                    server
                        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stopped)
                        .await
                }
                Some(tls) => {
                    let limits = celld_trust::Limits {
                        max_connections: 64,
                        per_address: 64,
                        handshake_timeout: Duration::from_secs(10),
                    };
                    let incoming =
                        celld_trust::incoming(listener, celld_trust::Transport::Tls(tls), limits);
                    server.serve_with_incoming_shutdown(incoming, stopped).await
                }
            };
        });
        nodes.push(node);
        stops.push(Some(stop));
    }
    say("ready");

    let mut commands = stdin_lines();
    while let Some(line) = commands.recv().await {
        let mut words = line.split_whitespace();
        if words.next() != Some("silence") {
            continue;
        }
        let at = unix_micros();
        let targets = words.next().unwrap_or("").split(',');
        for (index, kind) in targets.filter_map(|t| t.split_once(':')) {
            let Some(local) = index
                .parse::<usize>()
                .ok()
                .and_then(|i| i.checked_sub(args.first))
                .filter(|&l| l < args.count)
            else {
                continue;
            };
            if kind == "hung" {
                nodes[local].hung.store(true, Ordering::Relaxed);
            } else if let Some(stop) = stops[local].take() {
                // Graceful shutdown: the listener closes, idle HTTP/2 connections get
                // GOAWAY and close, reconnects are refused.
                let _ = stop.send(());
            }
        }
        say(&format!("silenced {at}"));
    }
    Ok(())
}

/// Node `index`'s server side: a certificate for its node id, as the master signs them.
fn node_tls(ca: &celld_trust::CellCa, index: usize) -> Result<celld_trust::ServerTls> {
    let id = crate::node_id(index);
    let (cert_pem, key_pem) = ca
        .issue_with_key(&celld_trust::Subject {
            role: celld_trust::Role::Node,
            name: &id,
            dns_names: vec![id.clone()],
            ttl: Duration::from_secs(86400),
        })
        .map_err(|e| format!("{id}: certificate: {e}"))?;
    let creds = celld_trust::Credentials {
        ca_pem: ca.cert_pem().to_string(),
        cert_pem,
        key_pem,
    };
    Ok(celld_trust::ServerTls::new(Some(creds.server_config()?)))
}

/// One line to the driver, flushed at once because the driver waits on it.
pub fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Commands from the driver. A plain thread blocks on stdin so the measured runtime has
/// nothing to do while no command comes.
pub fn stdin_lines() -> tokio::sync::mpsc::UnboundedReceiver<String> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

//! The gRPC face of celld: `celld.v1.Node`, plus health and reflection. Handlers are thin:
//! check the request, call the supervisor or the node, convert the answer.

pub mod convert;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use celld_proto::v1 as pb;
use celld_proto::v1::node_server::{Node, NodeServer};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::kernel::sysctl::{SysctlResult, apply_sysctls};
use crate::node;
use crate::reimage::{ReimageError, ReimageOrder, Reimager};
use crate::task::state::now_unix_ms;
use crate::task::{RunError, Supervisor};
use convert::*;

/// Largest request celld decodes; bigger ones are refused before they are read whole.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;

/// Facts fixed at start.
pub struct NodeFacts {
    pub image_version: String,
    pub mode: &'static str,
    pub boot_id: String,
    pub kernel_release: String,
    pub config_errors: Vec<String>,
    pub state_dir: PathBuf,
    /// The node's name towards the master when set (a daemon must not rename its host).
    pub node_name: String,
}

/// What the handlers share.
pub struct NodeAgent {
    pub supervisor: Supervisor,
    pub facts: NodeFacts,
    pub generation: Arc<AtomicU64>,
    pub sysctls: Mutex<BTreeMap<String, SysctlResult>>,
    pub sysctl_root: PathBuf,
    /// (condition, status) -> since, so "since" survives between polls.
    conditions_since: Mutex<BTreeMap<&'static str, (bool, i64)>>,
    /// Set by Reboot/Poweroff; main decides what that means in its mode.
    pub power: tokio::sync::watch::Sender<Option<Power>>,
    /// (kernel start to serving, celld start to serving), seconds; set once.
    ready: std::sync::OnceLock<(f64, f64)>,
    pub reimager: Reimager,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Power {
    Reboot,
    Poweroff,
    /// Reboot into the kernel a Reimage staged with kexec_file_load.
    Kexec,
}

impl NodeAgent {
    pub fn new(
        supervisor: Supervisor,
        facts: NodeFacts,
        generation: Arc<AtomicU64>,
        sysctl_root: PathBuf,
        reimager: Reimager,
    ) -> Self {
        Self {
            supervisor,
            facts,
            generation,
            sysctls: Mutex::new(BTreeMap::new()),
            sysctl_root,
            conditions_since: Mutex::new(BTreeMap::new()),
            power: tokio::sync::watch::channel(None).0,
            ready: std::sync::OnceLock::new(),
            reimager,
        }
    }

    pub fn set_ready(&self, boot_to_ready: f64, init_to_ready: f64) {
        let _ = self.ready.set((boot_to_ready, init_to_ready));
    }

    /// Applies sysctls and records each result for status.
    pub fn apply_sysctls(&self, wanted: &BTreeMap<String, String>) -> Vec<SysctlResult> {
        let results = apply_sysctls(&self.sysctl_root, wanted);
        if let Ok(mut kept) = self.sysctls.lock() {
            for r in &results {
                kept.insert(r.key.clone(), r.clone());
            }
        }
        self.generation.fetch_add(1, Ordering::SeqCst);
        results
    }

    pub fn status(&self) -> pb::NodeStatus {
        let generation = self.generation.load(Ordering::SeqCst);
        let limits = self.supervisor.allocatable();
        let capacity = pb::Resources {
            memory_bytes: node::memory_total_bytes(),
            cpu_millis: node::cpu_count() * 1000,
            pids_max: node::pid_max(),
        };
        let u = node::usage(&self.facts.state_dir);
        let conditions = node::conditions(&u, capacity.memory_bytes, capacity.pids_max);
        let now = now_unix_ms();
        let conditions = {
            let mut since = self
                .conditions_since
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            conditions
                .into_iter()
                .map(|c| {
                    let entry = since.entry(c.kind).or_insert((c.status, now));
                    if entry.0 != c.status {
                        *entry = (c.status, now);
                    }
                    pb::Condition {
                        r#type: c.kind.into(),
                        status: c.status,
                        reason: c.reason,
                        since_unix_ms: entry.1,
                    }
                })
                .collect()
        };
        let pressure = |p: Option<(f64, f64)>| {
            p.map(|(some, full)| pb::Pressure {
                some_avg10: some,
                full_avg10: full,
            })
        };
        let id = node::identity();
        let (cordoned, draining) = self.supervisor.cordon_state();
        pb::NodeStatus {
            generation,
            identity: Some(pb::NodeIdentity {
                machine_id: id.machine_id,
                hostname: if self.facts.node_name.is_empty() {
                    id.hostname
                } else {
                    self.facts.node_name.clone()
                },
                macs: id.macs,
                addresses: id.addresses,
            }),
            boot_id: self.facts.boot_id.clone(),
            image_version: self.facts.image_version.clone(),
            celld_version: env!("CARGO_PKG_VERSION").into(),
            kernel_release: self.facts.kernel_release.clone(),
            uptime_seconds: node::uptime_seconds(),
            boot_to_ready_seconds: self.ready.get().map(|r| r.0).unwrap_or(0.0),
            init_to_ready_seconds: self.ready.get().map(|r| r.1).unwrap_or(0.0),
            capacity: Some(capacity),
            allocatable: Some(pb::Resources {
                memory_bytes: limits.memory_bytes,
                cpu_millis: limits.cpu_millis,
                pids_max: limits.pids_max,
            }),
            usage: Some(pb::NodeUsage {
                memory_used_bytes: u.memory_used_bytes,
                memory_available_bytes: u.memory_available_bytes,
                load1: u.load[0],
                load5: u.load[1],
                load15: u.load[2],
                cpu_busy_usec: u.cpu_busy_usec,
                processes: u.processes,
                cpu_pressure: pressure(u.pressure[0]),
                memory_pressure: pressure(u.pressure[1]),
                io_pressure: pressure(u.pressure[2]),
                disk_free_bytes: u.disk_free_bytes,
            }),
            conditions,
            cordoned,
            draining,
            sysctls: self
                .sysctls
                .lock()
                .map(|s| s.values().map(sysctl_to_proto).collect())
                .unwrap_or_default(),
            tasks: self.supervisor.list("").iter().map(task_to_proto).collect(),
            landlock_abi: crate::sys::landlock_abi(),
            mode: self.facts.mode.into(),
            cgroup_version: self.supervisor.cgroup_version().into(),
            config_errors: self.facts.config_errors.clone(),
            unchanged: false,
            last_reimage_error: self.reimager.last_error(),
            reimage_in_progress: self.reimager.in_progress(),
        }
    }
}

fn sysctl_to_proto(r: &SysctlResult) -> pb::SysctlResult {
    pb::SysctlResult {
        key: r.key.clone(),
        wanted: r.wanted.clone(),
        actual: r.actual.clone(),
        error: r.error.clone(),
    }
}

fn run_error_to_status(e: RunError) -> Status {
    match e {
        RunError::Invalid(e) => Status::invalid_argument(e.to_string()),
        RunError::AlreadyExists(_) => Status::already_exists(e.to_string()),
        RunError::NotAccepting(_) => Status::failed_precondition(e.to_string()),
        RunError::NoRoom(_) => Status::resource_exhausted(e.to_string()),
        RunError::NotFound(_) => Status::not_found(e.to_string()),
    }
}

fn reimage_error_to_status(e: &ReimageError) -> Status {
    use ReimageError as E;
    let message = e.to_string();
    match e {
        E::NoMasterKey | E::TooBig { .. } | E::VerifiedNotPid1 { .. } | E::Http { .. } => {
            Status::failed_precondition(message)
        }
        E::Busy => Status::aborted(message),
        E::Version { .. }
        | E::Manifest { .. }
        | E::SignatureLength { .. }
        | E::Url { .. }
        | E::Cmdline { .. } => Status::invalid_argument(message),
        E::BadSignature => Status::permission_denied(message),
        E::Stalled { .. } => Status::deadline_exceeded(message),
        E::WrongSize { .. } | E::Checksum { .. } => Status::data_loss(message),
        E::Memory { .. } => Status::resource_exhausted(message),
    }
}

fn grace(ms: u32) -> Option<Duration> {
    (ms != 0).then(|| Duration::from_millis(ms.into()))
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The `celld.v1.Node` service.
#[derive(Clone)]
pub struct NodeApi {
    agent: Arc<NodeAgent>,
}

impl NodeApi {
    pub fn new(agent: Arc<NodeAgent>) -> Self {
        Self { agent }
    }

    pub fn into_server(self) -> NodeServer<Self> {
        NodeServer::new(self).max_decoding_message_size(MAX_REQUEST_BYTES)
    }
}

fn check_id(id: &str) -> Result<(), Status> {
    crate::task::spec::check_name("id", id).map_err(|e| Status::invalid_argument(e.to_string()))
}

#[tonic::async_trait]
impl Node for NodeApi {
    async fn get_status(
        &self,
        req: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::NodeStatus>, Status> {
        let since = req.into_inner().if_generation_differs_from;
        let current = self.agent.generation.load(Ordering::SeqCst);
        if since != 0 && since == current {
            return Ok(Response::new(pb::NodeStatus {
                generation: current,
                unchanged: true,
                ..Default::default()
            }));
        }
        Ok(Response::new(self.agent.status()))
    }

    async fn run_task(
        &self,
        req: Request<pb::RunTaskRequest>,
    ) -> Result<Response<pb::RunTaskResponse>, Status> {
        let spec = req
            .into_inner()
            .spec
            .ok_or_else(|| Status::invalid_argument("spec: is required"))?;
        let spec =
            task_spec_from_proto(spec).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let (view, created) = self
            .agent
            .supervisor
            .run_task(spec)
            .map_err(run_error_to_status)?;
        Ok(Response::new(pb::RunTaskResponse {
            task: Some(task_to_proto(&view)),
            created,
        }))
    }

    async fn kill_task(
        &self,
        req: Request<pb::KillTaskRequest>,
    ) -> Result<Response<pb::KillTaskResponse>, Status> {
        let r = req.into_inner();
        check_id(&r.id)?;
        let view = self
            .agent
            .supervisor
            .kill_task(&r.id, grace(r.grace_ms))
            .map_err(run_error_to_status)?;
        Ok(Response::new(pb::KillTaskResponse {
            task: Some(task_to_proto(&view)),
        }))
    }

    async fn list_tasks(
        &self,
        req: Request<pb::ListTasksRequest>,
    ) -> Result<Response<pb::ListTasksResponse>, Status> {
        let job = req.into_inner().job;
        if !job.is_empty() {
            crate::task::spec::check_name("job", &job)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
        }
        let tasks = self.agent.supervisor.list(&job);
        Ok(Response::new(pb::ListTasksResponse {
            tasks: tasks.iter().map(task_to_proto).collect(),
        }))
    }

    type WatchTasksStream = BoxStream<pb::TaskEvent>;

    async fn watch_tasks(
        &self,
        req: Request<pb::WatchTasksRequest>,
    ) -> Result<Response<Self::WatchTasksStream>, Status> {
        let initial = req.into_inner().initial_state;
        let mut rx = self.agent.supervisor.subscribe();
        let first: Vec<pb::TaskEvent> = if initial {
            let generation = self.agent.generation.load(Ordering::SeqCst);
            self.agent
                .supervisor
                .list("")
                .iter()
                .map(|v| pb::TaskEvent {
                    generation,
                    task: Some(task_to_proto(v)),
                })
                .collect()
        } else {
            Vec::new()
        };
        let stream = async_stream(move |tx| async move {
            for e in first {
                if tx.send(Ok(e)).await.is_err() {
                    return;
                }
            }
            loop {
                match rx.recv().await {
                    Ok((generation, view)) => {
                        let e = pb::TaskEvent {
                            generation,
                            task: Some(task_to_proto(&view)),
                        };
                        if tx.send(Ok(e)).await.is_err() {
                            return;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        let _ = tx
                            .send(Err(Status::data_loss(format!(
                                "watcher fell {n} events behind; watch again with initial_state"
                            ))))
                            .await;
                        return;
                    }
                    Err(_) => return,
                }
            }
        });
        Ok(Response::new(stream))
    }

    type TaskLogsStream = BoxStream<pb::LogLine>;

    async fn task_logs(
        &self,
        req: Request<pb::TaskLogsRequest>,
    ) -> Result<Response<Self::TaskLogsStream>, Status> {
        let r = req.into_inner();
        check_id(&r.id)?;
        let log = self
            .agent
            .supervisor
            .log(&r.id)
            .ok_or_else(|| Status::not_found(format!("no task {}", r.id)))?;
        let (lines, mut rx) = log.snapshot(r.tail as usize);
        let follow = r.follow;
        let supervisor = self.agent.supervisor.clone();
        let id = r.id;
        let stream = async_stream(move |tx| async move {
            let mut last = 0;
            for l in &lines {
                last = l.seq;
                if tx.send(Ok(log_to_proto(l))).await.is_err() {
                    return;
                }
            }
            if !follow {
                return;
            }
            loop {
                let next = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await;
                match next {
                    Ok(Ok(l)) if l.seq > last => {
                        last = l.seq;
                        if tx.send(Ok(log_to_proto(&l))).await.is_err() {
                            return;
                        }
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {}
                    Ok(Err(_)) => return,
                    Err(_) => {
                        // Quiet: stop following once the task is over for good.
                        let done = supervisor.get(&id).is_none_or(|v| v.done);
                        if done || tx.is_closed() {
                            return;
                        }
                    }
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn cordon(
        &self,
        _req: Request<pb::CordonRequest>,
    ) -> Result<Response<pb::CordonResponse>, Status> {
        self.agent.supervisor.set_cordoned(true);
        Ok(Response::new(pb::CordonResponse { cordoned: true }))
    }

    async fn uncordon(
        &self,
        _req: Request<pb::UncordonRequest>,
    ) -> Result<Response<pb::UncordonResponse>, Status> {
        self.agent.supervisor.set_cordoned(false);
        Ok(Response::new(pb::UncordonResponse { cordoned: false }))
    }

    async fn drain(
        &self,
        req: Request<pb::DrainRequest>,
    ) -> Result<Response<pb::DrainResponse>, Status> {
        let g = grace(req.into_inner().grace_ms);
        let evicted = self.agent.supervisor.drain(g);
        Ok(Response::new(pb::DrainResponse { evicted }))
    }

    async fn apply_sysctls(
        &self,
        req: Request<pb::ApplySysctlsRequest>,
    ) -> Result<Response<pb::ApplySysctlsResponse>, Status> {
        let wanted: BTreeMap<String, String> = req.into_inner().sysctls.into_iter().collect();
        if wanted.is_empty() {
            return Err(Status::invalid_argument("sysctls: give at least one key"));
        }
        if wanted.len() > 256 {
            return Err(Status::invalid_argument(
                "sysctls: at most 256 keys at once",
            ));
        }
        let agent = self.agent.clone();
        let results = tokio::task::spawn_blocking(move || agent.apply_sysctls(&wanted))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::ApplySysctlsResponse {
            results: results.iter().map(sysctl_to_proto).collect(),
        }))
    }

    async fn reimage(
        &self,
        req: Request<pb::ReimageRequest>,
    ) -> Result<Response<pb::ReimageResponse>, Status> {
        let order = reimage_order_from_proto(req.into_inner());
        let outcome = self.reimage_now(&order).await;
        self.agent
            .reimager
            .record(outcome.as_ref().err().map(|e| e.to_string()));
        match outcome {
            Ok(message) => Ok(Response::new(pb::ReimageResponse { message })),
            Err(e) => {
                tracing::warn!(version = %order.version, error = %e, "reimage refused");
                Err(reimage_error_to_status(&e))
            }
        }
    }

    async fn reboot(
        &self,
        _req: Request<pb::RebootRequest>,
    ) -> Result<Response<pb::RebootResponse>, Status> {
        self.request_power(Power::Reboot)?;
        Ok(Response::new(pb::RebootResponse {}))
    }

    async fn poweroff(
        &self,
        _req: Request<pb::PoweroffRequest>,
    ) -> Result<Response<pb::PoweroffResponse>, Status> {
        self.request_power(Power::Poweroff)?;
        Ok(Response::new(pb::PoweroffResponse {}))
    }
}

impl NodeApi {
    /// Checks and downloads the new image, stages it and asks for the reboot into it.
    async fn reimage_now(&self, order: &ReimageOrder) -> Result<String, ReimageError> {
        let reimager = &self.agent.reimager;
        let turn = reimager.begin()?;
        let image = reimager.verify_and_fetch(&turn, order).await?;
        if self.agent.facts.mode != "pid1" {
            return Err(ReimageError::VerifiedNotPid1 {
                version: image.version,
                kernel_bytes: image.kernel_bytes,
                initramfs_bytes: image.initramfs_bytes,
            });
        }
        // Where the kernel cannot kexec, a firmware reboot still moves the node: under
        // PXE the master serves the version it now assigns.
        let (how, message) = match image.stage() {
            Ok(()) => (
                Power::Kexec,
                format!(
                    "{} loaded; stopping tasks and rebooting by kexec",
                    image.version
                ),
            ),
            Err(e) => {
                tracing::error!(version = %image.version, error = %e.desc(), errno = ?e,
                    "kexec_file_load failed: rebooting by firmware instead");
                (
                    Power::Reboot,
                    format!(
                        "{} verified; stopping tasks and rebooting by firmware reboot \
                         (kexec_file_load: {e:?})",
                        image.version
                    ),
                )
            }
        };
        tracing::info!(version = %image.version, outcome = %message, "reimage accepted");
        turn.keep();
        self.agent.power.send_replace(Some(how));
        Ok(message)
    }

    fn request_power(&self, p: Power) -> Result<(), Status> {
        if self.agent.facts.mode != "pid1" {
            return Err(Status::failed_precondition(
                "celld runs as a daemon here: it does not reboot or power off the host",
            ));
        }
        self.agent.power.send_replace(Some(p));
        Ok(())
    }
}

/// A stream fed by a spawned producer through a small channel (back-pressure included).
fn async_stream<T, F, Fut>(producer: F) -> BoxStream<T>
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<Result<T, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(producer(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

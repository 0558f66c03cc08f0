//! Wiring: config -> supervisor -> gRPC server, the one reaper, signals, and shutdown.
//! The server takes its listener and a shutdown future, so tests bind 127.0.0.1:0.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use celld_trust::{Authorize, Limits, Transport, incoming, limit_http2};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use tokio::net::TcpListener;

use crate::api::{NodeAgent, NodeApi, NodeFacts};
use crate::cgroup::CgroupRoot;
use crate::config::NodeConfig;
use crate::node;
use crate::reimage::{ReimageSettings, Reimager};
use crate::task::seccomp::Profile;
use crate::task::spec::NodeLimits;
use crate::task::supervisor::SupervisorConfig;
use crate::task::{ExitStatus, Supervisor};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("state directory {path}: {source}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Seccomp(#[from] crate::task::seccomp::SeccompError),
    #[error("gRPC server: {0}")]
    Server(#[from] tonic::transport::Error),
    #[error("signal handler: {0}")]
    Signal(std::io::Error),
    #[error("server reflection: {0}")]
    Reflection(String),
}

/// Open connections celld serves at once (the master's, operators', a few tools), lowered
/// to fit the process's descriptor limit.
pub const MAX_CONNECTIONS: usize = 2048;
/// A caller that has not finished its TLS handshake by then is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything `serve` needs besides the listener.
pub struct Options {
    pub config: NodeConfig,
    pub config_errors: Vec<String>,
    /// "pid1" or "daemon".
    pub mode: &'static str,
    pub started: Instant,
    /// Kernel uptime when celld started (PID 1), for boot-to-ready.
    pub uptime_at_start: f64,
}

/// Builds the agent (supervisor, reaper, sysctls) from options.
pub fn build_agent(opts: &Options) -> Result<Arc<NodeAgent>, ServeError> {
    let cfg = &opts.config;
    let log_dir = cfg.state_dir.join("logs");
    std::fs::create_dir_all(&log_dir).map_err(|source| ServeError::StateDir {
        path: log_dir.clone(),
        source,
    })?;
    let generation = Arc::new(AtomicU64::new(1));
    let allocatable = NodeLimits {
        memory_bytes: node::memory_total_bytes().saturating_sub(cfg.reserved_memory_bytes),
        cpu_millis: (node::cpu_count() * 1000).saturating_sub(cfg.reserved_cpu_millis),
        pids_max: node::pid_max(),
    };
    let supervisor = Supervisor::new(
        SupervisorConfig {
            allocatable,
            log_dir: Some(log_dir),
            cgroups: CgroupRoot::detect(&cfg.cgroup_parent),
            seccomp: Profile::compile_default()?,
        },
        generation.clone(),
    );
    let facts = NodeFacts {
        image_version: cfg.image_version.clone(),
        mode: opts.mode,
        boot_id: node::boot_id(),
        kernel_release: node::kernel_release(),
        config_errors: opts.config_errors.clone(),
        state_dir: cfg.state_dir.clone(),
        node_name: cfg.hostname.clone(),
    };
    let reimager = Reimager::new(ReimageSettings::from_config(cfg), generation.clone());
    let agent = Arc::new(NodeAgent::new(
        supervisor,
        facts,
        generation,
        "/proc/sys".into(),
        reimager,
    ));
    if !cfg.sysctls.is_empty() {
        let results = agent.apply_sysctls(&cfg.sysctls);
        for r in results.iter().filter(|r| !r.error.is_empty()) {
            tracing::warn!(key = %r.key, error = %r.error, "sysctl from config not applied");
        }
        tracing::info!(
            applied = results.iter().filter(|r| r.error.is_empty()).count(),
            failed = results.iter().filter(|r| !r.error.is_empty()).count(),
            "sysctls"
        );
    }
    Ok(agent)
}

/// The one reaper: every child of celld is waited for here and its status handed to the
/// supervisor (unknown pids, such as orphans re-parented to PID 1, are just reaped).
pub fn start_reaper(supervisor: Supervisor) -> Result<(), ServeError> {
    let mut sigchld = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())
        .map_err(ServeError::Signal)?;
    tokio::spawn(async move {
        loop {
            // A periodic sweep too: a signal coalesced with another is not lost for long.
            let _ = tokio::time::timeout(Duration::from_secs(1), sigchld.recv()).await;
            loop {
                match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::Exited(pid, code)) => {
                        supervisor.on_exit(pid.as_raw() as u32, ExitStatus::Code(code))
                    }
                    Ok(WaitStatus::Signaled(pid, sig, _)) => {
                        supervisor.on_exit(pid.as_raw() as u32, ExitStatus::Signal(sig as i32))
                    }
                    Ok(WaitStatus::StillAlive) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        }
    });
    Ok(())
}

/// Serves `celld.v1.Node`, health and reflection on `listener` until `shutdown` resolves.
pub async fn serve(
    agent: Arc<NodeAgent>,
    listener: TcpListener,
    transport: Transport,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<celld_proto::v1::node_server::NodeServer<NodeApi>>()
        .await;
    // The same descriptor sets for both reflection versions grpcurl may ask for.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(celld_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;
    let incoming = incoming(
        listener,
        transport,
        Limits::within_fd_limit(MAX_CONNECTIONS, HANDSHAKE_TIMEOUT),
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let graceful = async move {
        let mut rx = stop_rx;
        let _ = rx.wait_for(|v| *v).await;
    };
    let server = limit_http2(
        tonic::transport::Server::builder().layer(Authorize::new(celld_trust::role::node_api)),
    )
    // 64 calls served at once per connection, half the 128 streams it may open: room for
    // long watches and log follows.
    .concurrency_limit_per_connection(64)
    .timeout(Duration::from_secs(60))
    .add_service(health)
    .add_service(reflection_v1)
    .add_service(reflection_v1alpha)
    .add_service(NodeApi::new(agent).into_server())
    .serve_with_incoming_shutdown(incoming, graceful);
    tokio::pin!(server);
    let shutdown = async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    };
    tokio::pin!(shutdown);
    tokio::select! {
        r = &mut server => return Ok(r?),
        _ = &mut shutdown => {}
    }
    // Open streams (a watching master, a following `logs`) must not hold shutdown up.
    if tokio::time::timeout(Duration::from_secs(2), &mut server)
        .await
        .is_err()
    {
        tracing::warn!("connections still open 2 s after shutdown: closing them");
    }
    Ok(())
}

/// Stops every task with its grace period and waits (bounded) for them to end.
pub async fn stop_all_tasks(supervisor: &Supervisor, reason: crate::task::state::Reason) {
    for t in supervisor.list("") {
        supervisor.evict(&t.id, reason, None);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while supervisor.any_running() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Task cgroups are removed a moment after their task ends.
    tokio::time::sleep(Duration::from_millis(300)).await;
    supervisor.release_cgroups();
}

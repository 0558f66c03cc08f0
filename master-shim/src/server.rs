//! `cellmaster serve`: the Master gRPC service (registration, admin reads) with the poller
//! running beside it. Takes its listener and a shutdown future, so tests bind port 0.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use celld_proto::v1 as pb;
use celld_proto::v1::master_server::{Master, MasterServer};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

use crate::jobfile::{JobFileError, Resources, check_fits_somewhere, parse_job_named};
use crate::poll::{Change, Fleet, GrpcSource, PollPolicy, Poller};
use crate::registry::{RegisterError, Registry};
use crate::store::{JobRow, NodeRow, NodeState, Store, StoreError, TaskRow};

/// Largest request the master decodes.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;

pub struct MasterState {
    pub registry: Mutex<Registry>,
    pub fleet: Fleet,
    pub policy: PollPolicy,
    pub store: Arc<dyn Store>,
    /// Why each pending task is pending, from the last placement pass.
    pub pending: Mutex<BTreeMap<String, String>>,
}

impl MasterState {
    pub fn new(policy: PollPolicy, store: Arc<dyn Store>) -> Arc<Self> {
        Arc::new(Self {
            registry: Mutex::new(Registry::default()),
            fleet: Arc::default(),
            policy,
            store,
            pending: Mutex::default(),
        })
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Clone)]
pub struct MasterApi {
    state: Arc<MasterState>,
}

#[tonic::async_trait]
impl Master for MasterApi {
    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let peer = req
            .remote_addr()
            .ok_or_else(|| Status::failed_precondition("the caller's address is unknown"))?;
        let r = req.into_inner();
        let (id, address) = self
            .state
            .registry()
            .register(&self.state.fleet, &r, peer.ip())
            .map_err(|e| match e {
                RegisterError::Invalid { .. } => Status::invalid_argument(e.to_string()),
                RegisterError::Impostor { .. } => Status::already_exists(e.to_string()),
            })?;
        // The store keeps the node so tasks can be placed on it (and it survives restarts).
        let allocatable = r.allocatable.unwrap_or_default();
        let row = NodeRow {
            id: id.clone(),
            address: address.clone(),
            labels: r.labels.clone().into_iter().collect(),
            state: NodeState::Unknown,
            cordoned: false,
            boot_id: r.boot_id.clone(),
            image_version: r.image_version.clone(),
            allocatable: Resources {
                memory_bytes: allocatable.memory_bytes,
                cpu_millis: allocatable.cpu_millis,
                pids_max: allocatable.pids_max,
            },
            last_seen_ms: 0,
        };
        self.state
            .store
            .put_node(&row)
            .map_err(|e| Status::internal(format!("storing node {id}: {e}")))?;
        tracing::info!(node = %id, %address, boot_id = %r.boot_id, image = %r.image_version, "node registered");
        Ok(Response::new(pb::RegisterResponse {
            node_id: id,
            poll_interval_ms: self.state.policy.interval.as_millis() as u32,
        }))
    }

    async fn submit_job(
        &self,
        req: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        let r = req.into_inner();
        let file = if r.file_name.is_empty() {
            "job.toml"
        } else {
            &r.file_name
        };
        let bad = |e: JobFileError| Status::invalid_argument(e.to_string());
        let job = parse_job_named(file, &r.job_toml).map_err(bad)?;
        let largest = {
            let registry = self.state.registry();
            registry
                .records
                .values()
                .filter_map(|n| n.allocatable)
                .map(|a| Resources {
                    memory_bytes: a.memory_bytes,
                    cpu_millis: a.cpu_millis,
                    pids_max: a.pids_max,
                })
                .max_by_key(|a| (a.memory_bytes, a.cpu_millis))
        };
        if let Some(largest) = largest {
            check_fits_somewhere(&job, largest).map_err(bad)?;
        }
        let tasks: Vec<TaskRow> = (0..job.replicas)
            .map(|i| TaskRow::pending_replica(&job, i))
            .collect();
        let row = JobRow {
            name: job.name.clone(),
            spec: job.clone(),
            created_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        };
        self.state
            .store
            .submit_job(&row, &tasks)
            .map_err(|e| match e {
                StoreError::AlreadyExists { .. } => {
                    Status::already_exists(format!("job {} exists already", job.name))
                }
                e => Status::internal(e.to_string()),
            })?;
        tracing::info!(job = %job.name, replicas = job.replicas, "job submitted");
        Ok(Response::new(pb::SubmitJobResponse {
            job: job.name,
            tasks: tasks.into_iter().map(|t| t.id).collect(),
        }))
    }

    async fn list_cell_tasks(
        &self,
        _req: Request<pb::ListCellTasksRequest>,
    ) -> Result<Response<pb::ListCellTasksResponse>, Status> {
        let tasks = self
            .state
            .store
            .list_tasks()
            .map_err(|e| Status::internal(e.to_string()))?;
        let pending = self.state.pending.lock().unwrap_or_else(|p| p.into_inner());
        let tasks = tasks
            .into_iter()
            .map(|t| pb::CellTask {
                reason: pending.get(&t.id).cloned().unwrap_or(t.reason),
                id: t.id,
                job: t.job,
                node: t.node.unwrap_or_default(),
                state: t.state.as_str().into(),
                priority: t.priority,
            })
            .collect();
        Ok(Response::new(pb::ListCellTasksResponse { tasks }))
    }

    async fn list_nodes(
        &self,
        _req: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let nodes = self.state.registry().summaries(&self.state.fleet);
        Ok(Response::new(pb::ListNodesResponse { nodes }))
    }
}

/// Serves until `shutdown`; the poller and the change consumer run until then too.
pub async fn serve(
    state: Arc<MasterState>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let (poller, mut changes) = Poller::new(
        GrpcSource::new(state.policy.timeout),
        state.policy.clone(),
        state.fleet.clone(),
    );
    let polling = tokio::spawn(poller.run());
    let consumer_state = state.clone();
    let consuming = tokio::spawn(async move {
        while let Some((id, change)) = changes.recv().await {
            match &change {
                Change::Ready => tracing::info!(node = %id, "node ready"),
                Change::Unknown => tracing::warn!(node = %id, "node missed a poll: unknown"),
                Change::Down => tracing::warn!(node = %id, "node down"),
                Change::Status(s) => {
                    tracing::debug!(node = %id, generation = s.generation, "node status")
                }
            }
            consumer_state.registry().apply(&id, &change);
        }
    });
    let placing_state = state.clone();
    let placing = tokio::spawn(async move {
        let mut tick = tokio::time::interval(placing_state.policy.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let store = placing_state.store.clone();
            match crate::placement::place_pending(&placing_state, &store).await {
                Ok(waiting) => {
                    *placing_state
                        .pending
                        .lock()
                        .unwrap_or_else(|p| p.into_inner()) = waiting
                }
                Err(e) => tracing::error!(error = %e, "placement pass failed"),
            }
        }
    });
    let api = MasterApi { state };
    let result = tonic::transport::Server::builder()
        .add_service(MasterServer::new(api).max_decoding_message_size(MAX_REQUEST_BYTES))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        )
        .await;
    polling.abort();
    consuming.abort();
    placing.abort();
    result
}

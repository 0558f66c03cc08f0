//! `cellmaster serve`: the Master gRPC service (registration, admin reads) with the poller
//! running beside it. Takes its listener and a shutdown future, so tests bind port 0.

use std::future::Future;
use std::sync::{Arc, Mutex};

use celld_proto::v1 as pb;
use celld_proto::v1::master_server::{Master, MasterServer};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

use crate::poll::{Change, Fleet, GrpcSource, PollPolicy, Poller};
use crate::registry::{RegisterError, Registry};

/// Largest request the master decodes.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;

pub struct MasterState {
    pub registry: Mutex<Registry>,
    pub fleet: Fleet,
    pub policy: PollPolicy,
}

impl MasterState {
    pub fn new(policy: PollPolicy) -> Arc<Self> {
        Arc::new(Self {
            registry: Mutex::new(Registry::default()),
            fleet: Arc::default(),
            policy,
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
        tracing::info!(node = %id, %address, boot_id = %r.boot_id, image = %r.image_version, "node registered");
        Ok(Response::new(pb::RegisterResponse {
            node_id: id,
            poll_interval_ms: self.state.policy.interval.as_millis() as u32,
        }))
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
    result
}

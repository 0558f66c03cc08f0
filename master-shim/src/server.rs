//! `cellmaster serve`: the master's shared state and its loops. The gRPC service
//! ([`crate::api`]) answers nodes and operators; beside it run the poller, the consumer of
//! its changes (liveness into the store, reconciliation of full statuses) and the
//! placement loop. Takes its listener and a shutdown future, so tests bind port 0.
//!
//! Everything that changes tasks (a placement pass, a reconciliation, a kill, a drain
//! step) holds [`MasterState::control`], so each sees the store as the others left it.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};

use celld_proto::v1::master_server::MasterServer;
use celld_trust::{Authorize, Limits, Transport, incoming, limit_http2};
use tokio::net::TcpListener;
use tokio::time::Instant;

use crate::api::MasterApi;
use crate::images::ImageStore;
use crate::nodes::NodeCalls;
use crate::poll::{Change, Fleet, GrpcSource, PollPolicy, Poller};
use crate::registry::Registry;
use crate::store::{Store, StoreError};

/// Largest request the master decodes.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;
/// Open connections the master serves at once (operators and registering nodes; it
/// calls nodes itself), lowered to fit the process's descriptor limit.
pub const MAX_CONNECTIONS: usize = 4096;
/// A caller that has not finished its TLS handshake by then is dropped.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

pub struct MasterState {
    pub registry: Mutex<Registry>,
    pub fleet: Fleet,
    pub policy: PollPolicy,
    pub store: Arc<dyn Store>,
    /// Why each pending task is pending, from the last placement pass.
    pub pending: Mutex<BTreeMap<String, String>>,
    /// Held by whatever changes tasks; see the module documentation.
    pub control: tokio::sync::Mutex<()>,
    /// When each task was last placed: a status older than that may not show it yet.
    pub placed_at: Mutex<BTreeMap<String, Instant>>,
    /// Kills a node did not take yet, by (node, task id on the node): retried every
    /// interval until the node answers.
    pub pending_kills: Mutex<BTreeMap<(String, String), u32>>,
    pub calls: NodeCalls,
    /// Node images by version, signed with the master's key.
    pub images: Arc<ImageStore>,
    /// How nodes reach this master's HTTP and gRPC; None when it serves no images.
    pub advertise: Option<Advertise>,
    /// Held while a rollout is read and written back: an operator's pause or abort and
    /// the engine's progress do not overwrite each other.
    pub rollout_write: Mutex<()>,
    /// The cell CA and the master's certificates; None with `--insecure`.
    pub trust: Option<Arc<crate::trust::MasterTrust>>,
}

/// The master as nodes reach it.
#[derive(Debug, Clone)]
pub struct Advertise {
    pub host: String,
    pub http_port: u16,
    pub grpc_port: u16,
}

impl Advertise {
    pub fn master_ref<'a>(
        &'a self,
        key_hex: &'a str,
        ca_fingerprint: Option<&'a str>,
        join: Option<&'a str>,
    ) -> crate::http::MasterRef<'a> {
        crate::http::MasterRef {
            host: &self.host,
            http_port: self.http_port,
            grpc_port: self.grpc_port,
            key_hex,
            ca_fingerprint,
            join,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves its data consistent, so a panic elsewhere does not
    // poison anything that matters.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl MasterState {
    /// The master's state, with the nodes the store remembers (polled again from New).
    pub fn new(
        policy: PollPolicy,
        store: Arc<dyn Store>,
        images: Arc<ImageStore>,
        advertise: Option<Advertise>,
        trust: Option<Arc<crate::trust::MasterTrust>>,
    ) -> Result<Arc<Self>, StoreError> {
        let fleet = Fleet::default();
        let mut registry = Registry::default();
        registry.load(&fleet, &store.list_nodes()?);
        Ok(Arc::new(Self {
            registry: Mutex::new(registry),
            fleet,
            policy,
            store,
            pending: Mutex::default(),
            control: tokio::sync::Mutex::new(()),
            placed_at: Mutex::default(),
            pending_kills: Mutex::default(),
            calls: NodeCalls::new(trust.clone()),
            images,
            advertise,
            rollout_write: Mutex::new(()),
            trust,
        }))
    }

    pub fn registry(&self) -> MutexGuard<'_, Registry> {
        lock(&self.registry)
    }

    pub fn pending_reasons(&self) -> MutexGuard<'_, BTreeMap<String, String>> {
        lock(&self.pending)
    }

    /// The address the poller uses for `node`.
    pub fn address(&self, node: &str) -> Option<String> {
        lock(&self.fleet).get(node).map(|h| h.address.clone())
    }

    pub fn note_placed(&self, task_id: &str) {
        lock(&self.placed_at).insert(task_id.to_string(), Instant::now());
    }

    /// Tasks placed within the last two intervals plus a call timeout: a status fetched
    /// before their RunTask can still be on its way.
    pub fn recent_placements(&self) -> BTreeSet<String> {
        let window = self.policy.interval * 2 + self.policy.timeout;
        let mut placed = lock(&self.placed_at);
        placed.retain(|_, at| at.elapsed() < window);
        placed.keys().cloned().collect()
    }

    /// Asks `node` to kill `node_task_id`; when it cannot be reached now, the kill is
    /// kept and retried every interval. Returns whether the node took it now.
    pub async fn kill_on_node(&self, node: &str, node_task_id: &str, grace_ms: u32) -> bool {
        let result = match self.address(node) {
            Some(address) => {
                self.calls
                    .kill_task(node, &address, node_task_id, grace_ms)
                    .await
            }
            None => Err(format!("node {node} is unknown")),
        };
        let key = (node.to_string(), node_task_id.to_string());
        match result {
            Ok(()) => {
                lock(&self.pending_kills).remove(&key);
                true
            }
            Err(e) => {
                tracing::warn!(%node, task = node_task_id, error = %e, "kill deferred");
                lock(&self.pending_kills).insert(key, grace_ms);
                false
            }
        }
    }

    async fn retry_kills(&self) {
        let kills: Vec<((String, String), u32)> = lock(&self.pending_kills)
            .iter()
            .map(|(k, g)| (k.clone(), *g))
            .collect();
        for ((node, task), grace) in kills {
            self.kill_on_node(&node, &task, grace).await;
        }
    }
}

/// Serves until `shutdown`; the poller, the change consumer and the placement loop run
/// until then too.
pub async fn serve(
    state: Arc<MasterState>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let (poller, mut changes) = Poller::new(
        GrpcSource::new(state.policy.timeout, state.trust.clone()),
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
            if let Err(e) = crate::control::on_change(&consumer_state, &id, change).await {
                tracing::error!(node = %id, error = %e, "applying a node's change failed");
            }
        }
    });
    let placing_state = state.clone();
    let placing = tokio::spawn(async move {
        let mut tick = tokio::time::interval(placing_state.policy.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            placing_state.retry_kills().await;
            if let Err(e) = crate::rollout::tick(&placing_state).await {
                tracing::error!(error = %e, "rollout step failed");
            }
            match crate::placement::place_pending(&placing_state).await {
                Ok(waiting) => *placing_state.pending_reasons() = waiting,
                Err(e) => tracing::error!(error = %e, "placement pass failed"),
            }
        }
    });
    let transport = match &state.trust {
        Some(trust) => Transport::Tls(trust.server.clone()),
        None => Transport::Plain,
    };
    let limits = Limits::within_fd_limit(MAX_CONNECTIONS, HANDSHAKE_TIMEOUT);
    let api = MasterApi::new(state);
    let result = limit_http2(
        tonic::transport::Server::builder().layer(Authorize::new(celld_trust::role::master_api)),
    )
    .add_service(MasterServer::new(api).max_decoding_message_size(MAX_REQUEST_BYTES))
    .serve_with_incoming_shutdown(incoming(listener, transport, limits), shutdown)
    .await;
    polling.abort();
    consuming.abort();
    placing.abort();
    result
}

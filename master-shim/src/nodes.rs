//! Calls from the master to nodes (RunTask, KillTask, ListTasks, TaskLogs), one lazily
//! connected channel per address, kept for reuse. Polling has its own client in `poll`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use celld_proto::v1 as pb;
use celld_proto::v1::node_client::NodeClient;
use celld_trust::client;
use tonic::transport::Channel;

use crate::trust::MasterTrust;

/// Longest a call to a node may take (a stream's first answer included).
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether a call reached the node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The node answered with an error.
    #[error("{0}")]
    Refused(String),
    /// No answer: the node may not have seen the call.
    #[error("unreached: {0}")]
    Unreached(String),
}

pub struct NodeCalls {
    /// By (address, node id).
    channels: Mutex<BTreeMap<(String, String), Channel>>,
    /// None with `--insecure`.
    trust: Option<Arc<MasterTrust>>,
}

/// What a node call failed with, for reasons shown to people.
fn describe(s: tonic::Status) -> String {
    format!("{}: {}", s.code(), s.message())
}

/// The call never got an answer from the node (refused, reset, or a connection that
/// died with the node's last boot).
fn transport_failed(s: &tonic::Status) -> bool {
    s.code() == tonic::Code::Unavailable
        || (s.code() == tonic::Code::Unknown && s.message().contains("transport error"))
}

impl NodeCalls {
    pub fn new(trust: Option<Arc<MasterTrust>>) -> NodeCalls {
        NodeCalls {
            channels: Mutex::default(),
            trust,
        }
    }

    /// A client for `node` at `address`; over TLS its certificate must name `node`.
    fn client(&self, node: &str, address: &str) -> Result<NodeClient<Channel>, String> {
        let key = (address.to_string(), node.to_string());
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = channels.get(&key) {
            return Ok(NodeClient::new(c.clone()));
        }
        let endpoint = client::endpoint(address, Duration::from_secs(2))
            .map_err(|e| format!("node {node}: {e}"))?;
        let tls = match &self.trust {
            Some(t) => Some(t.node_tls(node)?),
            None => None,
        };
        let c = client::connect_lazy(endpoint, tls.as_ref());
        channels.insert(key, c.clone());
        Ok(NodeClient::new(c))
    }

    /// Drops the channels to `address` (its node rebooted, or a call found it broken), so
    /// the next call connects afresh.
    pub fn forget(&self, address: &str) {
        self.channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(a, _), _| a != address);
    }

    /// `describe`, and the channel dropped when the connection is what failed.
    fn failed(&self, address: &str, s: tonic::Status) -> String {
        if transport_failed(&s) {
            self.forget(address);
        }
        describe(s)
    }

    /// `req` with the call timeout.
    fn timed<T>(req: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(req);
        r.set_timeout(CALL_TIMEOUT);
        r
    }

    pub async fn run_task(
        &self,
        node: &str,
        address: &str,
        spec: pb::TaskSpec,
    ) -> Result<(), String> {
        self.client(node, address)?
            .run_task(Self::timed(pb::RunTaskRequest { spec: Some(spec) }))
            .await
            .map(drop)
            .map_err(|s| self.failed(address, s))
    }

    /// Kills a task; one the node does not have counts as killed.
    pub async fn kill_task(
        &self,
        node: &str,
        address: &str,
        id: &str,
        grace_ms: u32,
    ) -> Result<(), String> {
        match self
            .client(node, address)?
            .kill_task(Self::timed(pb::KillTaskRequest {
                id: id.to_string(),
                grace_ms,
            }))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(()),
            Err(s) => Err(self.failed(address, s)),
        }
    }

    /// Every task the node knows, ended ones included.
    pub async fn list_tasks(
        &self,
        node: &str,
        address: &str,
    ) -> Result<Vec<pb::TaskStatus>, String> {
        Ok(self
            .client(node, address)?
            .list_tasks(Self::timed(pb::ListTasksRequest::default()))
            .await
            .map_err(|s| self.failed(address, s))?
            .into_inner()
            .tasks)
    }

    /// The node's status of one task.
    pub async fn task_status(
        &self,
        node: &str,
        address: &str,
        id: &str,
    ) -> Result<pb::TaskStatus, String> {
        self.list_tasks(node, address)
            .await?
            .into_iter()
            .find(|t| t.id == id)
            .ok_or_else(|| format!("the node has no task {id}"))
    }

    /// Asks the node to reimage; Ok is its message. `limit` bounds the whole call (the
    /// node downloads and checks the image before it answers).
    pub async fn reimage(
        &self,
        node: &str,
        address: &str,
        req: pb::ReimageRequest,
        limit: Duration,
    ) -> Result<String, CallError> {
        let mut r = tonic::Request::new(req);
        r.set_timeout(limit);
        self.client(node, address)
            .map_err(CallError::Unreached)?
            .reimage(r)
            .await
            .map(|r| r.into_inner().message)
            .map_err(|s| {
                if transport_failed(&s) {
                    CallError::Unreached(self.failed(address, s))
                } else {
                    CallError::Refused(describe(s))
                }
            })
    }

    /// A task's log stream. Followed streams run as long as the node keeps them open, so
    /// only the first answer is bounded by the call timeout.
    pub async fn logs(
        &self,
        node: &str,
        address: &str,
        req: pb::TaskLogsRequest,
    ) -> Result<tonic::Streaming<pb::LogLine>, tonic::Status> {
        let mut client = self
            .client(node, address)
            .map_err(tonic::Status::unavailable)?;
        tokio::time::timeout(CALL_TIMEOUT, client.task_logs(req))
            .await
            .map_err(|_| tonic::Status::deadline_exceeded(format!("{address} did not answer")))?
            .map(|r| r.into_inner())
    }
}

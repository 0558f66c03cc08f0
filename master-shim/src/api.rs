//! The `celld.v1.Master` gRPC service: thin, each call handed to the module that does
//! the work (registration in [`crate::control`], operators' calls in [`crate::admin`],
//! drains in [`crate::drain`]).

use std::pin::Pin;
use std::sync::Arc;

use celld_proto::v1 as pb;
use celld_proto::v1::master_server::Master;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::admin;
use crate::control::RegistrationError;
use crate::registry::RegisterError;
use crate::server::MasterState;

#[derive(Clone)]
pub struct MasterApi {
    state: Arc<MasterState>,
}

impl MasterApi {
    pub fn new(state: Arc<MasterState>) -> Self {
        Self { state }
    }
}

type Streamed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Ids in requests: what a job name, task id or node id can be.
pub fn check_id(field: &str, id: &str) -> Result<(), Status> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "{field}: {id:?} is not a name ([A-Za-z0-9._-], 1 to 128 characters)"
        )))
    }
}

#[tonic::async_trait]
impl Master for MasterApi {
    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let peer = req.extensions().get::<celld_trust::Peer>().cloned();
        let remote = peer
            .as_ref()
            .and_then(|p| p.remote)
            .ok_or_else(|| Status::failed_precondition("the caller's address is unknown"))?;
        let r = req.into_inner();
        let node = r
            .identity
            .as_ref()
            .map(|i| i.hostname.clone())
            .unwrap_or_default();
        // Checked before a token's use is counted; the registry checks it again.
        if !crate::registry::valid_node_id(&node) || node == celld_trust::MASTER_NAME {
            return Err(Status::invalid_argument(format!(
                "identity.hostname: {node:?} is not a node id ([A-Za-z0-9.-], 1 to 63 \
                 characters, not {:?})",
                celld_trust::MASTER_NAME
            )));
        }
        let (admitted, signed) = match &self.state.trust {
            None => ("insecure", None),
            Some(trust) => {
                let (by, signed) =
                    trust.certify(self.state.store.as_ref(), &r, &node, peer.as_ref())?;
                (by, Some(signed))
            }
        };
        let reg = crate::control::register(&self.state, &r, remote.ip())
            .await
            .map_err(|e| match e {
                RegistrationError::Refused(e @ RegisterError::Invalid { .. }) => {
                    Status::invalid_argument(e.to_string())
                }
                RegistrationError::Refused(e @ RegisterError::Impostor { .. }) => {
                    Status::already_exists(e.to_string())
                }
                RegistrationError::Store(e) => admin::internal(e),
            })?;
        tracing::info!(node = %reg.id, address = %reg.address, boot_id = %r.boot_id, image = %r.image_version, by = admitted, "node registered");
        let (certificate_pem, certificate_not_after) = signed.unwrap_or_default();
        Ok(Response::new(pb::RegisterResponse {
            node_id: reg.id,
            poll_interval_ms: self.state.policy.interval.as_millis() as u32,
            certificate_pem,
            ca_certificate_pem: self
                .state
                .trust
                .as_ref()
                .map(|t| t.ca.cert_pem().to_string())
                .unwrap_or_default(),
            certificate_not_after,
        }))
    }

    async fn create_join_token(
        &self,
        req: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<pb::CreateJoinTokenResponse>, Status> {
        crate::trust::create_token(&self.state, req.into_inner()).map(Response::new)
    }

    async fn list_nodes(
        &self,
        _req: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let nodes = self.state.registry().summaries(&self.state.fleet);
        Ok(Response::new(pb::ListNodesResponse { nodes }))
    }

    async fn submit_job(
        &self,
        req: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        admin::submit(&self.state, req.into_inner()).map(Response::new)
    }

    async fn list_cell_tasks(
        &self,
        _req: Request<pb::ListCellTasksRequest>,
    ) -> Result<Response<pb::ListCellTasksResponse>, Status> {
        let tasks = admin::list_tasks(&self.state)?;
        Ok(Response::new(pb::ListCellTasksResponse { tasks }))
    }

    async fn list_jobs(
        &self,
        _req: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let jobs = admin::list_jobs(&self.state)?;
        Ok(Response::new(pb::ListJobsResponse { jobs }))
    }

    async fn describe_node(
        &self,
        req: Request<pb::DescribeRequest>,
    ) -> Result<Response<pb::DescribeNodeResponse>, Status> {
        let id = req.into_inner().id;
        check_id("id", &id)?;
        admin::describe_node(&self.state, &id).map(Response::new)
    }

    async fn describe_job(
        &self,
        req: Request<pb::DescribeRequest>,
    ) -> Result<Response<pb::DescribeJobResponse>, Status> {
        let id = req.into_inner().id;
        check_id("id", &id)?;
        admin::describe_job(&self.state, &id).map(Response::new)
    }

    async fn describe_task(
        &self,
        req: Request<pb::DescribeRequest>,
    ) -> Result<Response<pb::DescribeTaskResponse>, Status> {
        let id = req.into_inner().id;
        check_id("id", &id)?;
        admin::describe_task(&self.state, &id)
            .await
            .map(Response::new)
    }

    async fn kill(
        &self,
        req: Request<pb::KillRequest>,
    ) -> Result<Response<pb::KillResponse>, Status> {
        let r = req.into_inner();
        check_id("target", &r.target)?;
        admin::kill(&self.state, r).await.map(Response::new)
    }

    async fn set_cordon(
        &self,
        req: Request<pb::SetCordonRequest>,
    ) -> Result<Response<pb::SetCordonResponse>, Status> {
        let r = req.into_inner();
        check_id("node", &r.node)?;
        admin::set_cordon(&self.state, &r.node, r.cordoned)
            .await
            .map(Response::new)
    }

    type DrainNodeStream = Streamed<pb::DrainProgress>;

    async fn drain_node(
        &self,
        req: Request<pb::DrainNodeRequest>,
    ) -> Result<Response<Self::DrainNodeStream>, Status> {
        let r = req.into_inner();
        check_id("node", &r.node)?;
        if !self.state.registry().records.contains_key(&r.node) {
            return Err(Status::not_found(format!(
                "node {:?} is not in the cell",
                r.node
            )));
        }
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(crate::drain::drain(self.state.clone(), r, tx));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    type CellTaskLogsStream = Streamed<pb::LogLine>;

    async fn cell_task_logs(
        &self,
        req: Request<pb::CellTaskLogsRequest>,
    ) -> Result<Response<Self::CellTaskLogsStream>, Status> {
        let r = req.into_inner();
        check_id("id", &r.id)?;
        let task = self
            .state
            .store
            .get_task(&r.id)
            .map_err(admin::internal)?
            .ok_or_else(|| Status::not_found(format!("task {:?} does not exist", r.id)))?;
        let Some(node) = task.node.clone() else {
            return Err(Status::failed_precondition(format!(
                "task {} is {} and on no node: no logs to read",
                task.id,
                task.state.as_str()
            )));
        };
        let address = self
            .state
            .address(&node)
            .ok_or_else(|| Status::unavailable(format!("node {node} is unknown")))?;
        let stream = self
            .state
            .calls
            .logs(
                &node,
                &address,
                pb::TaskLogsRequest {
                    id: task.node_task_id(),
                    follow: r.follow,
                    tail: r.tail,
                },
            )
            .await?;
        Ok(Response::new(Box::pin(stream)))
    }

    async fn add_image(
        &self,
        req: Request<tonic::Streaming<pb::ImageChunk>>,
    ) -> Result<Response<pb::AddImageResponse>, Status> {
        admin::add_image(&self.state, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn list_images(
        &self,
        _req: Request<pb::ListImagesRequest>,
    ) -> Result<Response<pb::ListImagesResponse>, Status> {
        admin::list_images(&self.state).map(Response::new)
    }

    async fn start_rollout(
        &self,
        req: Request<pb::StartRolloutRequest>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        let r = req.into_inner();
        crate::images::check_version(&r.to_version)
            .map_err(|e| Status::invalid_argument(format!("to_version: {e}")))?;
        let _control = self.state.control.lock().await;
        crate::rollout::start(&self.state, r).map(|r| Response::new(crate::rollout::to_pb(&r)))
    }

    async fn get_rollout(
        &self,
        _req: Request<pb::GetRolloutRequest>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        let r = self
            .state
            .store
            .last_rollout()
            .map_err(admin::internal)?
            .ok_or_else(|| Status::not_found("there is no rollout"))?;
        Ok(Response::new(crate::rollout::to_pb(&r)))
    }

    async fn control_rollout(
        &self,
        req: Request<pb::ControlRolloutRequest>,
    ) -> Result<Response<pb::RolloutStatus>, Status> {
        let action = pb::control_rollout_request::Action::try_from(req.into_inner().action)
            .unwrap_or(pb::control_rollout_request::Action::Unspecified);
        let _control = self.state.control.lock().await;
        crate::rollout::control(&self.state, action)
            .map(|r| Response::new(crate::rollout::to_pb(&r)))
    }
}

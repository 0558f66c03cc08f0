//! celld registers with the master named on its command line, and keeps trying while the
//! master is away. The master here is a stand-in that records what it is told.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use celld_proto::v1 as pb;
use celld_proto::v1::master_server::{Master, MasterServer};
use common::Node;

/// Every call but Register: this stand-in only records registrations.
fn refused() -> tonic::Status {
    tonic::Status::unimplemented("not in this stand-in")
}

type Refused<T> =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<T, tonic::Status>> + Send>>;

#[derive(Clone, Default)]
struct Recorder {
    seen: Arc<Mutex<Vec<(pb::RegisterRequest, std::net::SocketAddr)>>>,
}

#[tonic::async_trait]
impl Master for Recorder {
    async fn register(
        &self,
        req: tonic::Request<pb::RegisterRequest>,
    ) -> Result<tonic::Response<pb::RegisterResponse>, tonic::Status> {
        let peer = req.remote_addr().unwrap();
        self.seen.lock().unwrap().push((req.into_inner(), peer));
        Ok(tonic::Response::new(pb::RegisterResponse {
            node_id: "node-1".into(),
            poll_interval_ms: 2000,
            ..Default::default()
        }))
    }

    async fn list_nodes(
        &self,
        _req: tonic::Request<pb::ListNodesRequest>,
    ) -> Result<tonic::Response<pb::ListNodesResponse>, tonic::Status> {
        Err(refused())
    }

    async fn submit_job(
        &self,
        _req: tonic::Request<pb::SubmitJobRequest>,
    ) -> Result<tonic::Response<pb::SubmitJobResponse>, tonic::Status> {
        Err(refused())
    }

    async fn list_cell_tasks(
        &self,
        _req: tonic::Request<pb::ListCellTasksRequest>,
    ) -> Result<tonic::Response<pb::ListCellTasksResponse>, tonic::Status> {
        Err(refused())
    }

    async fn list_jobs(
        &self,
        _req: tonic::Request<pb::ListJobsRequest>,
    ) -> Result<tonic::Response<pb::ListJobsResponse>, tonic::Status> {
        Err(refused())
    }

    async fn describe_node(
        &self,
        _req: tonic::Request<pb::DescribeRequest>,
    ) -> Result<tonic::Response<pb::DescribeNodeResponse>, tonic::Status> {
        Err(refused())
    }

    async fn describe_job(
        &self,
        _req: tonic::Request<pb::DescribeRequest>,
    ) -> Result<tonic::Response<pb::DescribeJobResponse>, tonic::Status> {
        Err(refused())
    }

    async fn describe_task(
        &self,
        _req: tonic::Request<pb::DescribeRequest>,
    ) -> Result<tonic::Response<pb::DescribeTaskResponse>, tonic::Status> {
        Err(refused())
    }

    async fn kill(
        &self,
        _req: tonic::Request<pb::KillRequest>,
    ) -> Result<tonic::Response<pb::KillResponse>, tonic::Status> {
        Err(refused())
    }

    async fn set_cordon(
        &self,
        _req: tonic::Request<pb::SetCordonRequest>,
    ) -> Result<tonic::Response<pb::SetCordonResponse>, tonic::Status> {
        Err(refused())
    }

    async fn list_images(
        &self,
        _req: tonic::Request<pb::ListImagesRequest>,
    ) -> Result<tonic::Response<pb::ListImagesResponse>, tonic::Status> {
        Err(refused())
    }

    async fn start_rollout(
        &self,
        _req: tonic::Request<pb::StartRolloutRequest>,
    ) -> Result<tonic::Response<pb::RolloutStatus>, tonic::Status> {
        Err(refused())
    }

    async fn get_rollout(
        &self,
        _req: tonic::Request<pb::GetRolloutRequest>,
    ) -> Result<tonic::Response<pb::RolloutStatus>, tonic::Status> {
        Err(refused())
    }

    async fn control_rollout(
        &self,
        _req: tonic::Request<pb::ControlRolloutRequest>,
    ) -> Result<tonic::Response<pb::RolloutStatus>, tonic::Status> {
        Err(refused())
    }

    type DrainNodeStream = Refused<pb::DrainProgress>;

    async fn drain_node(
        &self,
        _req: tonic::Request<pb::DrainNodeRequest>,
    ) -> Result<tonic::Response<Self::DrainNodeStream>, tonic::Status> {
        Err(refused())
    }

    type CellTaskLogsStream = Refused<pb::LogLine>;

    async fn cell_task_logs(
        &self,
        _req: tonic::Request<pb::CellTaskLogsRequest>,
    ) -> Result<tonic::Response<Self::CellTaskLogsStream>, tonic::Status> {
        Err(refused())
    }

    async fn add_image(
        &self,
        _req: tonic::Request<tonic::Streaming<pb::ImageChunk>>,
    ) -> Result<tonic::Response<pb::AddImageResponse>, tonic::Status> {
        Err(refused())
    }

    async fn create_join_token(
        &self,
        _req: tonic::Request<pb::CreateJoinTokenRequest>,
    ) -> Result<tonic::Response<pb::CreateJoinTokenResponse>, tonic::Status> {
        Err(refused())
    }
}

#[tokio::test]
async fn celld_registers_once_the_master_comes_up() {
    let master_addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let master = master_addr.to_string();
    let mut n = Node::start_with(&["--master", &master]).await;
    // The master is away for a while: celld keeps serving.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let status = n.status().await;
    assert!(n.log().contains("registration failed"), "{}", n.log());

    let recorder = Recorder::default();
    let listener = tokio::net::TcpListener::bind(master_addr).await.unwrap();
    let server = tonic::transport::Server::builder()
        .add_service(MasterServer::new(recorder.clone()))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    let server = tokio::spawn(server);

    let deadline = Instant::now() + Duration::from_secs(40);
    while recorder.seen.lock().unwrap().is_empty() {
        assert!(
            Instant::now() < deadline,
            "no registration; celld log:\n{}",
            n.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (req, _peer) = recorder.seen.lock().unwrap()[0].clone();
    assert_eq!(req.boot_id, status.boot_id);
    let port: u32 = n.addr.rsplit_once(':').unwrap().1.parse().unwrap();
    assert_eq!(req.grpc_port, port);
    assert!(req.capacity.unwrap().memory_bytes > 0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        recorder.seen.lock().unwrap().len(),
        1,
        "registered more than once"
    );
    assert!(n.log().contains("registered with the master"));
    server.abort();
}

#[tokio::test]
async fn a_bad_master_address_is_refused_by_name() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_celld"))
        .args(["--master", "no-port-here"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("master"));
}

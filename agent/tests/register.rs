//! celld registers with the master named on its command line, and keeps trying while the
//! master is away. The master here is a stand-in that records what it is told.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use celld_proto::v1 as pb;
use celld_proto::v1::master_server::{Master, MasterServer};
use common::Node;

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
        }))
    }

    // The admin calls: a registration stand-in has no use for them.
    type DrainNodeStream = tokio_stream::Empty<Result<pb::DrainProgress, tonic::Status>>;
    type CellTaskLogsStream = tokio_stream::Empty<Result<pb::LogLine, tonic::Status>>;

    async fn list_nodes(
        &self,
        _: tonic::Request<pb::ListNodesRequest>,
    ) -> Reply<pb::ListNodesResponse> {
        not_here()
    }

    async fn submit_job(
        &self,
        _: tonic::Request<pb::SubmitJobRequest>,
    ) -> Reply<pb::SubmitJobResponse> {
        not_here()
    }

    async fn list_cell_tasks(
        &self,
        _: tonic::Request<pb::ListCellTasksRequest>,
    ) -> Reply<pb::ListCellTasksResponse> {
        not_here()
    }

    async fn list_jobs(
        &self,
        _: tonic::Request<pb::ListJobsRequest>,
    ) -> Reply<pb::ListJobsResponse> {
        not_here()
    }

    async fn describe_node(
        &self,
        _: tonic::Request<pb::DescribeRequest>,
    ) -> Reply<pb::DescribeNodeResponse> {
        not_here()
    }

    async fn describe_job(
        &self,
        _: tonic::Request<pb::DescribeRequest>,
    ) -> Reply<pb::DescribeJobResponse> {
        not_here()
    }

    async fn describe_task(
        &self,
        _: tonic::Request<pb::DescribeRequest>,
    ) -> Reply<pb::DescribeTaskResponse> {
        not_here()
    }

    async fn kill(&self, _: tonic::Request<pb::KillRequest>) -> Reply<pb::KillResponse> {
        not_here()
    }

    async fn set_cordon(
        &self,
        _: tonic::Request<pb::SetCordonRequest>,
    ) -> Reply<pb::SetCordonResponse> {
        not_here()
    }

    async fn drain_node(
        &self,
        _: tonic::Request<pb::DrainNodeRequest>,
    ) -> Reply<Self::DrainNodeStream> {
        not_here()
    }

    async fn cell_task_logs(
        &self,
        _: tonic::Request<pb::CellTaskLogsRequest>,
    ) -> Reply<Self::CellTaskLogsStream> {
        not_here()
    }
}

type Reply<T> = Result<tonic::Response<T>, tonic::Status>;

fn not_here<T>() -> Reply<T> {
    Err(tonic::Status::unimplemented("not in this stand-in"))
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
    assert!(n.log().contains("master not reached"), "{}", n.log());

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

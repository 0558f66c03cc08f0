//! Hostile clients against one celld: many idle connections, connections that send half
//! a request and stop, garbage instead of HTTP/2, an oversized request, HTTP/2 frame floods
//! and gRPC requests with broken framing. celld must keep answering a legitimate caller
//! through all of it.

mod common;
mod hostile_h2;

use std::time::{Duration, Instant};

use celld_proto::v1 as pb;
use common::Node;
use hostile_h2::{assert_malformed_refused, assert_well_formed_accepted, survive_every_flood};
use prost::Message;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const GET_STATUS: &str = "/celld.v1.Node/GetStatus";
const RUN_TASK: &str = "/celld.v1.Node/RunTask";

/// A connection from loopback address `from`: each flood comes from its own address, not
/// the legitimate caller's (127.0.0.1), because one address may hold only an eighth of
/// the node's connections (256); beyond that the node closes them at once.
async fn flood_connect(from: &str, addr: &str) -> TcpStream {
    let s = tokio::net::TcpSocket::new_v4().expect("socket");
    s.bind(format!("{from}:0").parse().expect("address"))
        .expect("bind");
    s.connect(addr.parse().expect("node address"))
        .await
        .expect("connect")
}

/// A fresh client's GetStatus answers within `limit`.
async fn answers_within(addr: &str, limit: Duration) -> Duration {
    let start = Instant::now();
    let mut c = tokio::time::timeout(
        limit,
        pb::node_client::NodeClient::connect(format!("http://{addr}")),
    )
    .await
    .expect("connecting took too long")
    .expect("connect");
    tokio::time::timeout(limit, c.get_status(pb::GetStatusRequest::default()))
        .await
        .expect("GetStatus took too long")
        .expect("GetStatus failed");
    start.elapsed()
}

#[tokio::test]
async fn idle_half_sent_and_garbage_connections_do_not_stop_legitimate_callers() {
    let n = Node::start().await;
    let addr = n.addr.clone();
    let limit = Duration::from_secs(5);

    // A thousand connections that say nothing (256 held, the rest closed at once).
    let mut idle = Vec::new();
    for _ in 0..1000 {
        idle.push(flood_connect("127.0.0.3", &addr).await);
    }
    let took = answers_within(&addr, limit).await;
    println!("GetStatus with 1000 idle connections open: {took:?}");

    // Two hundred that send the HTTP/2 preface and half a frame header, then stall.
    let mut stalled = Vec::new();
    for _ in 0..200 {
        let mut s = flood_connect("127.0.0.4", &addr).await;
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00")
            .await
            .expect("write");
        stalled.push(s);
    }
    let took = answers_within(&addr, limit).await;
    println!("... and 200 stalled half-requests: {took:?}");

    // Garbage instead of HTTP/2: the connection is dropped, the node goes on.
    for _ in 0..50 {
        let mut s = flood_connect("127.0.0.5", &addr).await;
        let _ = s.write_all(&[0xff; 4096]).await;
    }
    let took = answers_within(&addr, limit).await;
    println!("... and 50 garbage writers: {took:?}");
    drop((idle, stalled));
}

#[tokio::test]
async fn an_oversized_request_is_refused_and_the_node_answers_on() {
    let mut n = Node::start().await;
    let mut spec = n.spec("big", &["sleep", "1"]);
    spec.argv.push("x".repeat(4 << 20));
    let e = n
        .client
        .run_task(pb::RunTaskRequest { spec: Some(spec) })
        .await
        .expect_err("a 4 MiB request must be refused");
    assert!(
        matches!(
            e.code(),
            tonic::Code::ResourceExhausted | tonic::Code::OutOfRange | tonic::Code::InvalidArgument
        ),
        "{e:?}"
    );
    let status = n.status().await;
    assert!(status.tasks.iter().all(|t| t.id != "big"), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_floods_do_not_stop_legitimate_callers() {
    let n = Node::start().await;
    let client = n.client.clone();
    let get_status = || {
        let mut c = client.clone();
        async move {
            c.get_status(pb::GetStatusRequest::default())
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        }
    };
    survive_every_flood(&n.addr, GET_STATUS, get_status, || n.log()).await;
}

#[tokio::test]
async fn malformed_grpc_requests_get_clean_errors_and_start_nothing() {
    let mut n = Node::start().await;
    let request = |id| pb::RunTaskRequest {
        spec: Some(n.spec(id, &["sleep", "60"])),
    };
    let valid = request("malformed").encode_to_vec();
    assert_malformed_refused(&n.addr, RUN_TASK, &valid).await;
    let control = request("control").encode_to_vec();
    assert_well_formed_accepted(&n.addr, RUN_TASK, &control, || n.log()).await;
    let tasks = n
        .client
        .list_tasks(pb::ListTasksRequest::default())
        .await
        .expect("ListTasks")
        .into_inner()
        .tasks;
    let ids: Vec<&str> = tasks.iter().map(|t| t.id.as_str()).collect();
    assert_eq!(ids, ["control"], "{tasks:?}");
}

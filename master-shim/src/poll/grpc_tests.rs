//! `GrpcSource` against a small HTTP/2 node written with h2's server half: it answers
//! `GetStatus` the way tonic frames it (headers, one gRPC message, `grpc-status`
//! trailers) or with a trailers-only error. Compatibility with a real tonic server is
//! what the poll benchmark exercises.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::Response;
use tokio::net::TcpListener;

use super::*;

#[derive(Clone)]
enum Answer {
    Status(Box<pb::NodeStatus>),
    /// A trailers-only reply with this code and message.
    Error(&'static str, &'static str),
}

struct FakeNode {
    address: String,
    connections: Arc<AtomicUsize>,
    known_seen: Arc<std::sync::Mutex<Vec<u64>>>,
}

/// Serves on 127.0.0.1:0; after `per_connection` calls a connection is dropped.
async fn fake_node(answer: Answer, per_connection: usize) -> FakeNode {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let connections = Arc::new(AtomicUsize::new(0));
    let known_seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (count, seen) = (connections.clone(), known_seen.clone());
    tokio::spawn(async move {
        loop {
            let (socket, _) = listener.accept().await.unwrap();
            count.fetch_add(1, Ordering::SeqCst);
            let (answer, seen) = (answer.clone(), seen.clone());
            tokio::spawn(async move {
                let mut connection = h2::server::handshake(socket).await.unwrap();
                for _ in 0..per_connection {
                    let Some(Ok((request, respond))) = connection.accept().await else {
                        return;
                    };
                    let (answer, seen) = (answer.clone(), seen.clone());
                    tokio::spawn(async move {
                        answer_call(request, respond, answer, seen).await;
                    });
                }
                // GOAWAY: calls under way finish, new ones are refused, then it closes.
                connection.graceful_shutdown();
                while connection.accept().await.is_some() {}
            });
        }
    });
    FakeNode {
        address,
        connections,
        known_seen,
    }
}

async fn answer_call(
    request: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    answer: Answer,
    seen: Arc<std::sync::Mutex<Vec<u64>>>,
) {
    assert_eq!(request.uri().path(), GET_STATUS_PATH);
    assert_eq!(request.headers()[CONTENT_TYPE], "application/grpc");
    let mut body = request.into_body();
    let mut bytes = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        bytes.extend_from_slice(&chunk);
    }
    let asked = pb::GetStatusRequest::decode(&bytes[5..]).unwrap();
    seen.lock().unwrap().push(asked.if_generation_differs_from);
    let response = Response::builder().header(CONTENT_TYPE, "application/grpc");
    match answer {
        Answer::Status(status) => {
            let mut stream = respond
                .send_response(response.body(()).unwrap(), false)
                .unwrap();
            let mut message = BytesMut::new();
            message.put_u8(0);
            message.put_u32(status.encoded_len() as u32);
            status.encode(&mut message).unwrap();
            stream.reserve_capacity(message.len());
            stream.send_data(message.freeze(), false).unwrap();
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from_static("0"));
            stream.send_trailers(trailers).unwrap();
        }
        Answer::Error(code, message) => {
            let response = response
                .header("grpc-status", code)
                .header("grpc-message", message)
                .body(())
                .unwrap();
            respond.send_response(response, true).unwrap();
        }
    }
}

/// A status bigger than one 16 KiB HTTP/2 frame.
fn big_status() -> pb::NodeStatus {
    pb::NodeStatus {
        generation: 42,
        tasks: (0..200)
            .map(|i| pb::TaskStatus {
                id: format!("job-{i:03}-replica-with-a-long-name"),
                message: "x".repeat(100),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

#[tokio::test]
async fn polls_share_one_connection_and_carry_the_known_generation() {
    let node = fake_node(Answer::Status(Box::new(big_status())), usize::MAX).await;
    let source = GrpcSource::new(Duration::from_secs(5), None);
    for known in [0, 42, 7] {
        let status = source.get_status("n", &node.address, known).await.unwrap();
        assert_eq!(status, big_status(), "a reply over several DATA frames");
    }
    assert_eq!(*node.known_seen.lock().unwrap(), vec![0, 42, 7]);
    assert_eq!(node.connections.load(Ordering::SeqCst), 1);
    assert_eq!(source.connections(), 1);
    source.forget(&node.address);
    assert_eq!(source.connections(), 0);
}

#[tokio::test]
async fn a_grpc_error_is_a_failed_poll_with_the_nodes_message() {
    let node = fake_node(Answer::Error("14", "draining"), usize::MAX).await;
    let source = GrpcSource::new(Duration::from_secs(5), None);
    let error = source.get_status("n", &node.address, 0).await.unwrap_err();
    assert!(error.contains("grpc-status 14: draining"), "{error}");
    // The connection itself is fine and kept.
    assert_eq!(source.connections(), 1);
}

#[tokio::test]
async fn a_closed_connection_is_opened_again() {
    let unchanged = pb::NodeStatus {
        generation: 3,
        unchanged: true,
        ..Default::default()
    };
    let node = fake_node(Answer::Status(Box::new(unchanged.clone())), 1).await;
    let source = GrpcSource::new(Duration::from_secs(5), None);
    assert_eq!(
        source.get_status("n", &node.address, 3).await,
        Ok(unchanged.clone())
    );
    // The node dropped that connection. Whether the client notices before or after
    // its next request, at most one poll fails and the next one reconnects.
    let mut failed = Vec::new();
    for _ in 0..3 {
        match source.get_status("n", &node.address, 3).await {
            Ok(s) => {
                assert_eq!(s, unchanged);
                break;
            }
            Err(e) => failed.push(e),
        }
    }
    assert!(failed.len() <= 1, "{failed:?}");
    assert!(node.connections.load(Ordering::SeqCst) >= 2);
}

#[tokio::test]
async fn a_node_that_is_not_listening_is_a_failed_poll() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    drop(listener);
    let source = GrpcSource::new(Duration::from_secs(5), None);
    let error = source.get_status("n", &address, 0).await.unwrap_err();
    assert!(error.contains("connect"), "{error}");
    assert_eq!(source.connections(), 0);
    let error = source
        .get_status("n", "not an address", 0)
        .await
        .unwrap_err();
    assert!(error.contains("not an address"), "{error}");
}

#[test]
fn malformed_messages_are_errors_not_statuses() {
    let framed = |compressed: u8, len: u32, body: &[u8]| {
        let mut b = BytesMut::new();
        b.put_u8(compressed);
        b.put_u32(len);
        b.extend_from_slice(body);
        b.freeze()
    };
    assert!(decode_message(Bytes::from_static(b"\0\0")).is_err());
    assert!(decode_message(framed(1, 0, b"")).is_err());
    assert!(decode_message(framed(0, 9, b"\x08\x01")).is_err());
    assert!(decode_message(framed(0, 2, b"\xff\xff")).is_err());
    let ok = decode_message(framed(0, 2, b"\x08\x05")).unwrap();
    assert_eq!(ok.generation, 5);
    assert_eq!(encode_request(5)[..], [0, 0, 0, 0, 2, 0x08, 0x05]);
}

//! `GetStatus` over HTTP/2 with the `h2` crate directly: one connection per node address,
//! kept open between polls, and one stream per poll.
//!
//! Why not a tonic `Channel`: a channel is a tower buffer with a worker task of its own,
//! hyper's dispatcher and a reconnect layer in front of the same h2 connection, and it
//! sends a request's headers and body in two writes. At 10,000 nodes polled every second
//! that is most of the master's core and about 65 KiB a node (see the poll section of
//! docs/BENCHMARKS.md). Here a poll is one write (HEADERS and DATA queued before the
//! connection task flushes), one read for the reply, and a few allocations.
//!
//! What this must not do: speak any call but `GetStatus`, or hold a connection for an
//! address the poller has forgotten.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use celld_proto::v1 as pb;
use h2::client::SendRequest;
use http::header::{CONTENT_TYPE, HeaderMap, HeaderValue, TE};
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use prost::Message;

use super::StatusSource;
use crate::trust::MasterTrust;

const GET_STATUS_PATH: &str = "/celld.v1.Node/GetStatus";
/// A larger reply is refused (tonic's default decode limit).
const MAX_REPLY_BYTES: usize = 4 << 20;
/// Per-stream receive window. A full status (about 20 KB with 100 tasks) fits in one
/// window, so a reply needs no WINDOW_UPDATE round trip.
const STREAM_WINDOW: u32 = 256 << 10;
/// Per-connection receive window: large, so the connection-level WINDOW_UPDATE (an extra
/// write) comes once every few dozen full replies rather than every other one. It is a
/// credit, not a buffer: nothing is allocated for it.
const CONNECTION_WINDOW: u32 = 8 << 20;

/// One node's open connection and the request target it serves.
#[derive(Clone)]
struct NodeConnection {
    /// Tells a broken connection from the one that replaced it.
    serial: u64,
    send: SendRequest<Bytes>,
    uri: Uri,
}

/// Polls over gRPC, one HTTP/2 connection per node address, opened at the first poll and
/// again after it breaks.
pub struct GrpcSource {
    connections: Mutex<HashMap<String, NodeConnection>>,
    opened: AtomicU64,
    /// Bounds connecting (the poller bounds the whole call as well).
    pub timeout: Duration,
    /// Mutual TLS towards nodes; None with `--insecure`.
    trust: Option<Arc<MasterTrust>>,
}

impl GrpcSource {
    pub fn new(timeout: Duration, trust: Option<Arc<MasterTrust>>) -> Self {
        Self {
            trust,
            connections: Mutex::new(HashMap::new()),
            opened: AtomicU64::new(0),
            timeout,
        }
    }

    /// How many node connections are held (for tests and the benchmark).
    pub fn connections(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, NodeConnection>> {
        self.connections.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn connect(&self, node: &str, address: &str) -> Result<NodeConnection, String> {
        let authority: Authority = address
            .parse()
            .map_err(|e| format!("node address {address:?}: {e}"))?;
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(if self.trust.is_some() {
            Scheme::HTTPS
        } else {
            Scheme::HTTP
        });
        parts.authority = Some(authority);
        parts.path_and_query = Some(PathAndQuery::from_static(GET_STATUS_PATH));
        let uri = Uri::from_parts(parts).map_err(|e| format!("node address {address:?}: {e}"))?;
        let tcp = tokio::time::timeout(self.timeout, tokio::net::TcpStream::connect(address))
            .await
            .map_err(|_| format!("connect {address}: no answer in {:?}", self.timeout))?
            .map_err(|e| format!("connect {address}: {e}"))?;
        // Requests are small and answered at once; do not let Nagle hold them.
        tcp.set_nodelay(true)
            .map_err(|e| format!("connect {address}: TCP_NODELAY: {e}"))?;
        let send = match &self.trust {
            None => handshake(tcp).await,
            Some(trust) => {
                let tls = trust.node_tls(node)?;
                let stream = tokio::time::timeout(self.timeout, tls.handshake(tcp))
                    .await
                    .map_err(|_| format!("TLS with {address}: no answer in {:?}", self.timeout))?
                    .map_err(|e| format!("TLS with {address} (node {node}): {e}"))?;
                handshake(stream).await
            }
        }
        .map_err(|e| format!("HTTP/2 handshake with {address}: {e}"))?;
        Ok(NodeConnection {
            serial: self.opened.fetch_add(1, Ordering::Relaxed),
            send,
            uri,
        })
    }

    /// The held connection to `address`, or a new one.
    async fn connection(
        &self,
        node: &str,
        address: &str,
    ) -> Result<(NodeConnection, bool), String> {
        if let Some(held) = self.lock().get(address).cloned() {
            return Ok((held, true));
        }
        let fresh = self.connect(node, address).await?;
        self.lock().insert(address.to_string(), fresh.clone());
        Ok((fresh, false))
    }

    /// Drops the held connection to `address` if it is still `broken`.
    fn drop_connection(&self, address: &str, broken: &NodeConnection) {
        let mut connections = self.lock();
        if connections
            .get(address)
            .is_some_and(|c| c.serial == broken.serial)
        {
            connections.remove(address);
        }
    }
}

impl StatusSource for GrpcSource {
    async fn get_status(
        &self,
        node: &str,
        address: &str,
        known: u64,
    ) -> Result<pb::NodeStatus, String> {
        let body = encode_request(known);
        let (connection, held) = self.connection(node, address).await?;
        let response = match start_call(&connection, body.clone()).await {
            Ok(r) => r,
            // A held connection may have closed since the last poll (node restarted,
            // idle peer): one fresh connection before calling it a miss.
            Err(e) if held => {
                self.drop_connection(address, &connection);
                tracing::debug!(node_address = address, error = %e, "reconnecting");
                let (fresh, _) = self.connection(node, address).await?;
                start_call(&fresh, body)
                    .await
                    .map_err(|e| format!("{address}: {e}"))?
            }
            Err(e) => {
                self.drop_connection(address, &connection);
                return Err(format!("{address}: {e}"));
            }
        };
        match read_reply(response).await {
            Ok(status) => Ok(status),
            Err(CallError::Connection(e)) => {
                self.drop_connection(address, &connection);
                Err(format!("{address}: {e}"))
            }
            Err(CallError::Reply(e)) => Err(format!("{address}: {e}")),
        }
    }

    fn forget(&self, address: &str) {
        self.lock().remove(address);
    }
}

/// HTTP/2 over `io`; the connection's own task reads and writes the socket. It ends when
/// the node closes or the last `SendRequest` is dropped (the address was forgotten).
async fn handshake<T>(io: T) -> Result<SendRequest<Bytes>, h2::Error>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (send, connection) = h2::client::Builder::new()
        .enable_push(false)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_send_buffer_size(16 << 10)
        .handshake::<_, Bytes>(io)
        .await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(send)
}

enum CallError {
    /// The connection failed: it is dropped and opened again at the next poll.
    Connection(h2::Error),
    /// The node answered, but not with a status.
    Reply(String),
}

impl From<h2::Error> for CallError {
    fn from(e: h2::Error) -> Self {
        if e.is_reset() && !e.is_go_away() {
            // One stream refused; the connection is fine.
            CallError::Reply(e.to_string())
        } else {
            CallError::Connection(e)
        }
    }
}

/// The gRPC message: a 5-byte prefix (not compressed, length) and the request.
fn encode_request(known: u64) -> Bytes {
    let request = pb::GetStatusRequest {
        if_generation_differs_from: known,
    };
    let len = request.encoded_len();
    let mut buf = BytesMut::with_capacity(5 + len);
    buf.put_u8(0);
    buf.put_u32(len as u32);
    // Cannot fail: the buffer has room for the whole message.
    let _ = request.encode(&mut buf);
    buf.freeze()
}

/// Sends headers and body in one go: both frames are queued before the connection task
/// runs, so they leave in one write.
async fn start_call(
    connection: &NodeConnection,
    body: Bytes,
) -> Result<h2::client::ResponseFuture, h2::Error> {
    let mut send = connection.send.clone().ready().await?;
    let mut request = http::Request::new(());
    *request.method_mut() = http::Method::POST;
    *request.uri_mut() = connection.uri.clone();
    let headers = request.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert(TE, HeaderValue::from_static("trailers"));
    let (response, mut stream) = send.send_request(request, false)?;
    stream.send_data(body, true)?;
    Ok(response)
}

async fn read_reply(response: h2::client::ResponseFuture) -> Result<pb::NodeStatus, CallError> {
    let response = response.await?;
    if response.status() != http::StatusCode::OK {
        return Err(CallError::Reply(format!(
            "HTTP status {}",
            response.status()
        )));
    }
    // A trailers-only answer carries the gRPC status in the headers: an error.
    grpc_status(response.headers(), false)?;
    let mut body = response.into_body();
    let mut message = Bytes::new();
    let mut pieces: Option<BytesMut> = None;
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        let held = pieces.as_ref().map_or(message.len(), BytesMut::len);
        if held + chunk.len() > MAX_REPLY_BYTES + 5 {
            return Err(CallError::Reply(format!(
                "reply larger than {MAX_REPLY_BYTES} bytes"
            )));
        }
        // Most replies come in one DATA frame; only longer ones are copied together.
        match &mut pieces {
            None if message.is_empty() => message = chunk,
            None => {
                let mut joined = BytesMut::with_capacity(message.len() + chunk.len());
                joined.extend_from_slice(&message);
                joined.extend_from_slice(&chunk);
                pieces = Some(joined);
            }
            Some(joined) => joined.extend_from_slice(&chunk),
        }
    }
    let trailers = body.trailers().await?.unwrap_or_default();
    grpc_status(&trailers, true)?;
    let message = pieces.map_or(message, BytesMut::freeze);
    decode_message(message).map_err(CallError::Reply)
}

/// Checks `grpc-status`; `required` for trailers, where a missing status is an error.
fn grpc_status(headers: &HeaderMap, required: bool) -> Result<(), CallError> {
    match headers.get("grpc-status").map(HeaderValue::as_bytes) {
        Some(b"0") => Ok(()),
        None if !required => Ok(()),
        None => Err(CallError::Reply("reply without grpc-status".into())),
        Some(code) => {
            let message = headers
                .get("grpc-message")
                .and_then(|m| m.to_str().ok())
                .unwrap_or("");
            Err(CallError::Reply(format!(
                "grpc-status {}: {message}",
                String::from_utf8_lossy(code)
            )))
        }
    }
}

fn decode_message(mut message: Bytes) -> Result<pb::NodeStatus, String> {
    if message.len() < 5 {
        return Err(format!(
            "reply of {} bytes has no gRPC message",
            message.len()
        ));
    }
    let compressed = message.get_u8();
    let len = message.get_u32() as usize;
    if compressed != 0 {
        return Err("reply is compressed, which was not asked for".into());
    }
    if len != message.len() {
        return Err(format!(
            "reply says {len} bytes but carries {}",
            message.len()
        ));
    }
    super::lite::LiteStatus::decode(message)
        .map(pb::NodeStatus::from)
        .map_err(|e| format!("reply does not decode: {e}"))
}

#[cfg(test)]
#[path = "grpc_tests.rs"]
mod tests;

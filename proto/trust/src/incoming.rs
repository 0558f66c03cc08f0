//! The servers' accept loop: a cap on open connections, TLS handshakes off the accept
//! path with a deadline, and the caller's identity (from its certificate) handed to every
//! request of the connection as a `Peer` extension.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::ca::{Identity, identity_of};

/// Who is on the other end of a connection.
#[derive(Clone, Debug)]
pub struct Peer {
    pub remote: Option<SocketAddr>,
    /// False only on a server started with `--insecure`: no TLS, no checks.
    pub tls: bool,
    /// From a client certificate that chained to the cell CA.
    pub identity: Option<Identity>,
    /// Why a verified certificate still gave no identity (no role in it).
    pub problem: Option<String>,
}

/// The server's current TLS configuration; replaced when its certificate is renewed.
/// `None` until the server has a certificate: connections are then refused.
#[derive(Clone, Default)]
pub struct ServerTls(Arc<RwLock<Option<Arc<ServerConfig>>>>);

impl ServerTls {
    pub fn new(config: Option<ServerConfig>) -> ServerTls {
        ServerTls(Arc::new(RwLock::new(config.map(Arc::new))))
    }

    pub fn set(&self, config: ServerConfig) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(config));
    }

    pub fn current(&self) -> Option<Arc<ServerConfig>> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Plain text (development only) or TLS.
#[derive(Clone)]
pub enum Transport {
    Plain,
    Tls(ServerTls),
}

/// Bounds on callers that the accept loop enforces.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Open connections (TLS handshakes in progress included); further callers wait in
    /// the kernel's backlog until one closes.
    pub max_connections: usize,
    /// Open connections from one IP address: a flood from one host cannot take every
    /// slot. Connections beyond it are closed at once.
    pub per_address: usize,
    /// A caller that has not finished its TLS handshake by then is dropped.
    pub handshake_timeout: Duration,
}

impl Limits {
    /// `wanted` connections, but leave 256 file descriptors of the process's limit for
    /// everything else (task logs, cgroup files, the store); an eighth of them (at least
    /// 16) from any one address.
    pub fn within_fd_limit(wanted: usize, handshake_timeout: Duration) -> Limits {
        let mut lim = open_files_soft_limit();
        if lim == 0 {
            lim = 1024;
        }
        let max_connections = wanted.min(lim.saturating_sub(256).max(16));
        Limits {
            max_connections,
            per_address: (max_connections / 8).max(16),
            handshake_timeout,
        }
    }
}

/// The HTTP/2 limits both servers set (README, "Limits on callers"): tonic otherwise
/// leaves two of them unlimited.
pub fn limit_http2<L>(server: tonic::transport::Server<L>) -> tonic::transport::Server<L> {
    server
        // A vanished caller (a `logs -f`, a watch, a poller): pinged after 30 s idle,
        // dropped if silent 10 s after the ping.
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        // tonic sets no stream limit of its own; 128 open calls on one connection is more
        // than a CLI, a node or the master makes. A client waits for a slot beyond that.
        .max_concurrent_streams(128)
        // Streams opened and reset before being served (CVE-2023-44487 "rapid reset"): the
        // 21st on one connection gets it a GOAWAY. h2's default, stated here.
        .http2_max_pending_accept_reset_streams(Some(20))
        // Streams the server must reset for a broken request; tonic leaves this unlimited
        // (RUSTSEC-2024-0003). Well-behaved clients cause none: GOAWAY after 100.
        .http2_max_local_error_reset_streams(Some(100))
        // Our callers' headers are well under 1 KiB; 16 KiB is hyper's default, stated.
        .http2_max_header_list_size(16 * 1024)
        // HTTP/2's smallest frame size: requests are 1 MiB at most, larger frames buy nothing.
        .max_frame_size(16 * 1024)
}

/// Open connections per remote address.
#[derive(Clone, Default)]
struct PerAddress(Arc<Mutex<HashMap<IpAddr, usize>>>);

/// One connection's count under its address; given back on drop.
struct AddressSlot {
    counts: PerAddress,
    ip: IpAddr,
}

impl PerAddress {
    fn take(&self, ip: IpAddr, max: usize) -> Option<AddressSlot> {
        let mut counts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(AddressSlot {
            counts: self.clone(),
            ip,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// RLIMIT_NOFILE's soft value, from /proc (0 if unreadable).
fn open_files_soft_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3).map(str::to_string))
        })
        .and_then(|soft| soft.parse().ok())
        .unwrap_or(0)
}

enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// One accepted connection; holds its slot under the cap until dropped.
pub struct Connection {
    io: Io,
    peer: Peer,
    _slot: OwnedSemaphorePermit,
    _address: AddressSlot,
}

impl Connected for Connection {
    type ConnectInfo = Peer;
    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Accepts on `listener` until the returned stream is dropped.
pub fn incoming(
    listener: TcpListener,
    transport: Transport,
    limits: Limits,
) -> ReceiverStream<io::Result<Connection>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(accept_loop(listener, transport, limits, tx));
    ReceiverStream::new(rx)
}

async fn accept_loop(
    listener: TcpListener,
    transport: Transport,
    limits: Limits,
    tx: mpsc::Sender<io::Result<Connection>>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let per_address = PerAddress::default();
    let mut warned_full = false;
    let mut refused_address: u64 = 0;
    loop {
        let slot = if let Ok(s) = slots.clone().try_acquire_owned() {
            warned_full = false;
            s
        } else {
            if !warned_full {
                tracing::warn!(
                    max = limits.max_connections,
                    "connection cap reached: new callers wait until one closes"
                );
                warned_full = true;
            }
            tokio::select! {
                _ = tx.closed() => return,
                s = slots.clone().acquire_owned() => match s { Ok(s) => s, Err(_) => return },
            }
        };
        let accepted = tokio::select! {
            _ = tx.closed() => return,
            a = listener.accept() => a,
        };
        let (tcp, remote) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors or a connection reset before accept: back off a
                // moment rather than spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(address_slot) = per_address.take(remote.ip(), limits.per_address) else {
            // Logged at the 1st, 2nd, 4th, 8th... refusal: a flood does not flood the log.
            refused_address += 1;
            if refused_address.is_power_of_two() {
                tracing::warn!(
                    %remote,
                    per_address = limits.per_address,
                    refused = refused_address,
                    "too many connections from one address: closed"
                );
            }
            continue;
        };
        let _ = tcp.set_nodelay(true);
        match &transport {
            Transport::Plain => {
                let conn = Connection {
                    io: Io::Plain(tcp),
                    peer: Peer {
                        remote: Some(remote),
                        tls: false,
                        identity: None,
                        problem: None,
                    },
                    _slot: slot,
                    _address: address_slot,
                };
                if tx.send(Ok(conn)).await.is_err() {
                    return;
                }
            }
            Transport::Tls(tls) => {
                let Some(config) = tls.current() else {
                    tracing::debug!(%remote, "no certificate yet: connection refused");
                    continue;
                };
                let tx = tx.clone();
                let deadline = limits.handshake_timeout;
                tokio::spawn(async move {
                    let acceptor = tokio_rustls::TlsAcceptor::from(config);
                    let stream = match tokio::time::timeout(deadline, acceptor.accept(tcp)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(%remote, error = %e, "TLS handshake refused");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%remote, "TLS handshake not finished in time");
                            return;
                        }
                    };
                    let leaf = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| identity_of(c));
                    let (identity, problem) = match leaf {
                        Some(Ok(id)) => (Some(id), None),
                        Some(Err(e)) => (None, Some(e)),
                        None => (None, None),
                    };
                    let conn = Connection {
                        io: Io::Tls(Box::new(stream)),
                        peer: Peer {
                            remote: Some(remote),
                            tls: true,
                            identity,
                            problem,
                        },
                        _slot: slot,
                        _address: address_slot,
                    };
                    let _ = tx.send(Ok(conn)).await;
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_address_gets_its_share_and_gives_it_back() {
        let counts = PerAddress::default();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let held: Vec<_> = (0..3).map(|_| counts.take(a, 3).unwrap()).collect();
        assert!(counts.take(a, 3).is_none(), "a fourth from one address");
        assert!(
            counts.take(b, 3).is_some(),
            "another address is not affected"
        );
        drop(held);
        assert!(
            counts.0.lock().unwrap().is_empty(),
            "counts forgotten at zero"
        );
        assert!(counts.take(a, 3).is_some());
    }
}

//! Clients: a tonic channel over TLS (or plain text on request) to a named server.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tonic::transport::{Channel, Endpoint};
use tower_service::Service;

/// How a client reaches one server: its TLS configuration and the name its certificate
/// must carry (a node id, or `cellmaster`).
#[derive(Clone)]
pub struct ClientTls {
    pub config: Arc<ClientConfig>,
    pub server_name: ServerName<'static>,
}

impl ClientTls {
    pub fn new(config: Arc<ClientConfig>, server_name: &str) -> Result<ClientTls, String> {
        let server_name = ServerName::try_from(server_name.to_string())
            .map_err(|e| format!("server name {server_name:?}: {e}"))?;
        Ok(ClientTls {
            config,
            server_name,
        })
    }

    /// TCP then TLS to `address` (host:port).
    pub async fn connect(&self, address: &str) -> io::Result<TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(address).await?;
        tcp.set_nodelay(true)?;
        self.handshake(tcp).await
    }

    /// TLS over a connected socket, the server's certificate checked against the name.
    pub async fn handshake(&self, tcp: TcpStream) -> io::Result<TlsStream<TcpStream>> {
        tokio_rustls::TlsConnector::from(self.config.clone())
            .connect(self.server_name.clone(), tcp)
            .await
    }
}

/// The connector a TLS channel dials with.
#[derive(Clone)]
struct Dial {
    tls: ClientTls,
}

impl Service<Uri> for Dial {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let tls = self.tls.clone();
        Box::pin(async move {
            let authority = uri
                .authority()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no address"))?;
            Ok(TokioIo::new(tls.connect(authority.as_str()).await?))
        })
    }
}

/// An error with its causes: a transport error's own text hides why (a refused
/// certificate, a closed port).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// An endpoint for `address` (host:port) with the usual timeouts.
pub fn endpoint(address: &str, connect_timeout: Duration) -> Result<Endpoint, String> {
    Ok(Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| format!("address {address:?}: {e}"))?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true))
}

/// Connects now; plain text when `tls` is None (`--insecure`).
pub async fn connect(
    endpoint: Endpoint,
    tls: Option<&ClientTls>,
) -> Result<Channel, tonic::transport::Error> {
    match tls {
        None => endpoint.connect().await,
        Some(tls) => {
            endpoint
                .connect_with_connector(Dial { tls: tls.clone() })
                .await
        }
    }
}

/// Connects at first use.
pub fn connect_lazy(endpoint: Endpoint, tls: Option<&ClientTls>) -> Channel {
    match tls {
        None => endpoint.connect_lazy(),
        Some(tls) => endpoint.connect_with_connector_lazy(Dial { tls: tls.clone() }),
    }
}

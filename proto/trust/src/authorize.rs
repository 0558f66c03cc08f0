//! The per-call check: a tower layer in front of every service of a server. It reads the
//! `Peer` of the connection and the method's `Need`, and answers UNAUTHENTICATED or
//! PERMISSION_DENIED itself, so no handler runs for a caller who may not call it.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::Status;
use tower_layer::Layer;
use tower_service::Service;

use crate::incoming::Peer;
use crate::role::Need;

/// Whether the caller on `peer` may make a call that needs `need` at `path`.
pub fn check(need: Need, path: &str, peer: Option<&Peer>) -> Result<(), Status> {
    let Some(peer) = peer else {
        return Err(Status::unauthenticated("connection without a known peer"));
    };
    if !peer.tls {
        return Ok(());
    }
    let needed = match need {
        Need::Nothing | Need::Registration => return Ok(()),
        Need::Role(r) => r,
    };
    match &peer.identity {
        None => Err(Status::unauthenticated(match &peer.problem {
            Some(p) => format!("{path}: client certificate not usable: {p}"),
            None => format!(
                "{path}: a client certificate of the cell CA with role {needed} or higher is required"
            ),
        })),
        Some(id) if id.role.allows(needed) => Ok(()),
        Some(id) => Err(Status::permission_denied(format!(
            "{path}: {} {:?} may not call this; it needs role {needed}",
            id.role, id.name
        ))),
    }
}

/// The layer; `policy` maps a method path to what it needs.
#[derive(Clone, Copy)]
pub struct Authorize {
    policy: fn(&str) -> Need,
}

impl Authorize {
    pub fn new(policy: fn(&str) -> Need) -> Authorize {
        Authorize { policy }
    }
}

impl<S> Layer<S> for Authorize {
    type Service = AuthorizeService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AuthorizeService {
            inner,
            policy: self.policy,
        }
    }
}

#[derive(Clone)]
pub struct AuthorizeService<S> {
    inner: S,
    policy: fn(&str) -> Need,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> Service<http::Request<B>> for AuthorizeService<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let path = req.uri().path();
        match check((self.policy)(path), path, req.extensions().get::<Peer>()) {
            Ok(()) => Box::pin(self.inner.call(req)),
            Err(status) => {
                tracing::debug!(%path, code = ?status.code(), message = status.message(), "call refused");
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

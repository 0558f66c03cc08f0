//! How the peers of a celld cell prove who they are.
//!
//! The master keeps the cell CA. Every certificate it signs names a role in its subject
//! (`O=celld:<role>`, `CN=<name>`): nodes (`node`, serving as their node id), the master
//! (`master`, serving as `cellmaster`) and people (`reader`, `operator`, `admin`). Both
//! servers accept TLS 1.3 only, ask every caller for a certificate of the CA, and check
//! each call against the role table in [`role`]. Plain text exists for development only.

pub mod authorize;
pub mod bundle;
pub mod ca;
pub mod client;
pub mod incoming;
pub mod manifest;
pub mod role;
pub mod tls;

pub use authorize::Authorize;
pub use bundle::Bundle;
pub use ca::{CellCa, Identity, Subject, fingerprint, identity_of};
pub use client::ClientTls;
pub use incoming::{Limits, Peer, ServerTls, Transport, incoming, limit_http2};
pub use role::{Need, Role};
pub use tls::{Credentials, MASTER_NAME};

/// The banner both programs print at every start without TLS.
pub const INSECURE_WARNING: &str = "INSECURE: --insecure given: no TLS, no client certificates, \
no roles; anyone who reaches this port may run tasks as root. For development only.";

/// Both programs' log filter unless `RUST_LOG` says otherwise: INFO, but the h2 crate only
/// at ERROR. h2 warns once for every connection it sends GOAWAY to for a flood (rapid
/// resets, broken requests); under attack that is a line per attacking connection, on
/// celld a serial console. The floods are cut off either way (see README, Limits).
pub const DEFAULT_LOG_FILTER: &str = "info,h2=error";

//! Registration with the master (`celld.master=host:port`): announced once per boot,
//! retried with jittered exponential backoff while the master is away. Tasks run
//! meanwhile; nothing here blocks the node. Over TLS (the default) the registration is
//! also how the node gets its certificate: its key is made in memory, the master signs
//! a CSR, and the node registers again before the certificate ends to renew it.

use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::Duration;

use celld_proto::v1 as pb;
use celld_proto::v1::master_client::MasterClient;

use celld_trust::ca::{fingerprint, new_key_and_csr, now_secs, pem_certificates};
use celld_trust::client;
use celld_trust::tls::pinned_client_config;
use celld_trust::{ClientTls, Credentials, MASTER_NAME, ServerTls};

use crate::api::NodeAgent;

const FIRST_DELAY: Duration = Duration::from_millis(500);
const MAX_DELAY: Duration = Duration::from_secs(30);

/// Delay before retry number `attempt` (0-based): doubling from 0.5 s up to 30 s, then
/// scaled by `jitter` in [0.5, 1.0) so a fleet rebooting together does not knock on the
/// master in step.
pub fn retry_delay(attempt: u32, jitter: f64) -> Duration {
    let base = FIRST_DELAY
        .saturating_mul(1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX))
        .min(MAX_DELAY);
    base.mul_f64(jitter.clamp(0.5, 1.0))
}

/// A number in [0.5, 1.0) from the process's randomly keyed hasher.
fn jitter() -> f64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    0.5 + (h.finish() % 1000) as f64 / 2000.0
}

fn request(agent: &NodeAgent, grpc_port: u16, labels: &[(String, String)]) -> pb::RegisterRequest {
    let status = agent.status();
    pb::RegisterRequest {
        identity: status.identity,
        boot_id: status.boot_id,
        image_version: status.image_version,
        celld_version: status.celld_version,
        grpc_port: grpc_port.into(),
        capacity: status.capacity,
        allocatable: status.allocatable,
        labels: labels.iter().cloned().collect(),
        join_token: String::new(),
        csr: Vec::new(),
    }
}

/// What a node needs to join a cell over TLS: a token for its first registration, the
/// CA's fingerprint to know the master by, and its own server, which gets the certificate.
pub struct Join {
    pub token: String,
    pub ca_fingerprint: String,
    pub server: ServerTls,
}

async fn try_register(
    master: &str,
    req: pb::RegisterRequest,
    tls: Option<&ClientTls>,
) -> Result<pb::RegisterResponse, String> {
    let endpoint = client::endpoint(master, Duration::from_secs(3))
        .map_err(|e| format!("master: {e}"))?
        .timeout(Duration::from_secs(5));
    let channel = client::connect(endpoint, tls)
        .await
        .map_err(|e| client::error_chain(&e))?;
    MasterClient::new(channel)
        .register(req)
        .await
        .map(|r| r.into_inner())
        .map_err(|s| format!("{}: {}", s.code(), s.message()))
}

/// The node's certificate now, and when it ends.
struct Held {
    credentials: Credentials,
    not_after: i64,
}

/// One registration over TLS: a fresh key and CSR; the node's own certificate while it is
/// valid (a renewal), else the join token with the master known by the CA fingerprint.
async fn register_tls(
    master: &str,
    mut req: pb::RegisterRequest,
    join: &Join,
    held: Option<&Held>,
) -> Result<(pb::RegisterResponse, Held), String> {
    let name = req
        .identity
        .as_ref()
        .map(|i| i.hostname.clone())
        .unwrap_or_default();
    let (key, csr) = new_key_and_csr(&name).map_err(|e| e.to_string())?;
    req.csr = csr;
    let renewing = held.filter(|h| h.not_after > now_secs() + 5);
    let config = match renewing {
        Some(h) => h.credentials.client_config()?,
        None => {
            req.join_token = join.token.clone();
            pinned_client_config(&join.ca_fingerprint)?
        }
    };
    let tls = ClientTls::new(Arc::new(config), MASTER_NAME)?;
    let reply = try_register(master, req, Some(&tls)).await?;
    let ca_pem = reply.ca_certificate_pem.clone();
    let ca_fingerprint = pem_certificates(&ca_pem)?
        .first()
        .map(|c| fingerprint(c))
        .unwrap_or_default();
    if ca_fingerprint != join.ca_fingerprint.to_ascii_lowercase() {
        return Err(format!(
            "the master sent a CA with fingerprint {ca_fingerprint:?}, not celld.ca={}",
            join.ca_fingerprint
        ));
    }
    let credentials = Credentials {
        ca_pem,
        cert_pem: reply.certificate_pem.clone(),
        key_pem: key.serialize_pem(),
    };
    let identity = credentials.identity()?;
    if identity.name != reply.node_id {
        return Err(format!(
            "the master's certificate names {:?}, not node {:?}",
            identity.name, reply.node_id
        ));
    }
    join.server.set(credentials.server_config()?);
    let not_after = identity.not_after;
    Ok((
        reply,
        Held {
            credentials,
            not_after,
        },
    ))
}

/// When to renew a certificate valid until `not_after`: two thirds into what is left,
/// at least 5 s from now.
pub fn renew_in(not_after: i64, now: i64) -> Duration {
    let left = (not_after - now).max(0) as u64;
    Duration::from_secs((left * 2 / 3).max(5))
}

/// Registers, retrying until the master answers; over TLS, then keeps renewing the
/// node's certificate before it ends. Returns only without TLS (or never).
pub async fn register_until_done(
    master: String,
    agent: Arc<NodeAgent>,
    grpc_port: u16,
    labels: Vec<(String, String)>,
    join: Option<Join>,
) -> Option<pb::RegisterResponse> {
    let mut attempt = 0u32;
    let mut held: Option<Held> = None;
    loop {
        let req = request(&agent, grpc_port, &labels);
        let result = match &join {
            None => try_register(&master, req, None).await.map(|r| (r, None)),
            Some(join) => register_tls(&master, req, join, held.as_ref())
                .await
                .map(|(r, h)| (r, Some(h))),
        };
        match result {
            Ok((r, None)) => {
                tracing::info!(%master, node_id = %r.node_id, attempts = attempt + 1, "registered with the master");
                return Some(r);
            }
            Ok((r, Some(h))) => {
                let wait = renew_in(h.not_after, now_secs());
                tracing::info!(%master, node_id = %r.node_id, attempts = attempt + 1,
                    certificate_ends = h.not_after, renew_in_s = wait.as_secs(),
                    renewal = held.is_some(), "registered with the master; certificate in place");
                held = Some(h);
                attempt = 0;
                tokio::time::sleep(wait).await;
            }
            Err(error) => {
                let delay = retry_delay(attempt, jitter());
                tracing::warn!(%master, %error, attempt = attempt + 1, retry_in_ms = delay.as_millis() as u64, "registration failed; tasks keep running");
                tokio::time::sleep(delay).await;
                attempt = attempt.saturating_add(1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_cap_and_jitter_only_shortens() {
        assert_eq!(retry_delay(0, 1.0), Duration::from_millis(500));
        assert_eq!(retry_delay(1, 1.0), Duration::from_secs(1));
        assert_eq!(retry_delay(3, 1.0), Duration::from_secs(4));
        assert_eq!(retry_delay(10, 1.0), MAX_DELAY);
        assert_eq!(retry_delay(u32::MAX, 1.0), MAX_DELAY);
        assert_eq!(retry_delay(0, 0.5), Duration::from_millis(250));
        assert_eq!(retry_delay(0, 0.0), Duration::from_millis(250));
        let j = jitter();
        assert!((0.5..1.0).contains(&j));
    }
}

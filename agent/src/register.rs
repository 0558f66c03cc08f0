//! Registration with the master (`celld.master=host:port`): announced once per boot,
//! retried with jittered exponential backoff while the master is away. Tasks run
//! meanwhile; nothing here blocks the node.

use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::Duration;

use celld_proto::v1 as pb;
use celld_proto::v1::master_client::MasterClient;

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
    }
}

async fn try_register(
    master: &str,
    req: pb::RegisterRequest,
) -> Result<pb::RegisterResponse, String> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{master}"))
        .map_err(|e| format!("master address {master:?}: {e}"))?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(5));
    let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
    MasterClient::new(channel)
        .register(req)
        .await
        .map(|r| r.into_inner())
        .map_err(|s| format!("{}: {}", s.code(), s.message()))
}

/// Registers, retrying until the master answers. Returns the master's answer.
pub async fn register_until_done(
    master: String,
    agent: Arc<NodeAgent>,
    grpc_port: u16,
    labels: Vec<(String, String)>,
) -> pb::RegisterResponse {
    let mut attempt = 0u32;
    loop {
        match try_register(&master, request(&agent, grpc_port, &labels)).await {
            Ok(r) => {
                tracing::info!(%master, node_id = %r.node_id, attempts = attempt + 1, "registered with the master");
                return r;
            }
            Err(error) => {
                let delay = retry_delay(attempt, jitter());
                tracing::warn!(%master, %error, attempt = attempt + 1, retry_in_ms = delay.as_millis() as u64, "master not reached; tasks keep running");
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

//! The master's side of trust: the cell CA (made at first start, kept beside the store,
//! key mode 0600), the master's own certificate, join tokens, and the admission of a
//! registering node: a join token, or the node's own certificate when it renews.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use celld_proto::v1 as pb;
use celld_trust::ca::{hex, now_secs};
use celld_trust::{CellCa, ClientTls, Credentials, MASTER_NAME, Peer, Role, ServerTls, Subject};
use rustls::ClientConfig;
use tonic::Status;

use crate::images::sha256_hex;
use crate::store::{JoinToken, Store, TokenRefusal};

/// How long the master's own certificate lasts; it is made anew at every start.
const MASTER_CERT_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

pub struct MasterTrust {
    pub ca: CellCa,
    /// The master's server configuration (its certificate, clients of the CA).
    pub server: ServerTls,
    /// The master's client configuration towards nodes.
    node_client: Arc<ClientConfig>,
    pub node_cert_ttl: Duration,
}

/// Writes `text` to `path` readable by its owner only, replacing it whole.
pub fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

pub fn ca_paths(state_dir: &Path) -> (PathBuf, PathBuf) {
    (state_dir.join("ca.crt"), state_dir.join("ca.key"))
}

/// The CA in `state_dir`, made if there is none. Refuses a key readable by others.
pub fn load_or_create_ca(state_dir: &Path) -> Result<CellCa, String> {
    let (cert_path, key_path) = ca_paths(state_dir);
    if !key_path.exists() {
        let cell = std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default();
        let (ca, key_pem) = CellCa::create(&cell).map_err(|e| e.to_string())?;
        write_private(&key_path, &key_pem).map_err(|e| format!("{}: {e}", key_path.display()))?;
        std::fs::write(&cert_path, ca.cert_pem())
            .map_err(|e| format!("{}: {e}", cert_path.display()))?;
        tracing::info!(fingerprint = %ca.fingerprint(), path = %cert_path.display(), "cell CA created");
        return Ok(ca);
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&key_path)
        .map_err(|e| format!("{}: {e}", key_path.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(format!(
            "{}: mode {:o} lets others read the CA key; chmod 600 it",
            key_path.display(),
            mode & 0o777
        ));
    }
    let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()));
    CellCa::load(&read(&cert_path)?, &read(&key_path)?)
        .map_err(|e| format!("{}: {e}", cert_path.display()))
}

impl MasterTrust {
    pub fn new(ca: CellCa, node_cert_ttl: Duration) -> Result<MasterTrust, String> {
        let (cert_pem, key_pem) = ca
            .issue_with_key(&Subject {
                role: Role::Master,
                name: MASTER_NAME,
                dns_names: vec![MASTER_NAME.to_string()],
                ttl: MASTER_CERT_TTL,
            })
            .map_err(|e| format!("the master's certificate: {e}"))?;
        let own = Credentials {
            ca_pem: ca.cert_pem().to_string(),
            cert_pem,
            key_pem,
        };
        Ok(MasterTrust {
            server: ServerTls::new(Some(own.server_config()?)),
            node_client: Arc::new(own.client_config()?),
            ca,
            node_cert_ttl,
        })
    }

    pub fn fingerprint(&self) -> String {
        self.ca.fingerprint()
    }

    /// How the master reaches `node`: its certificate must name the node id.
    pub fn node_tls(&self, node: &str) -> Result<ClientTls, String> {
        ClientTls::new(self.node_client.clone(), node)
    }

    /// A registering node's certificate: its CSR signed first (one that does not parse
    /// uses no token), then its admission checked and counted (`admit`). Returns how it
    /// was admitted, the certificate and when it ends.
    pub fn certify(
        &self,
        store: &dyn Store,
        req: &pb::RegisterRequest,
        node: &str,
        peer: Option<&Peer>,
    ) -> Result<(&'static str, (String, i64)), Status> {
        if req.csr.is_empty() {
            return Err(Status::invalid_argument(
                "csr: empty; this master signs a certificate for every node",
            ));
        }
        let signed = self
            .sign_node(&req.csr, node)
            .map_err(|e| Status::invalid_argument(format!("csr: {e}")))?;
        let by = admit(store, req, node, peer).inspect_err(|s| {
            let remote = peer.and_then(|p| p.remote);
            tracing::warn!(%node, ?remote, reason = s.message(), "registration refused")
        })?;
        Ok((by, signed))
    }

    /// Signs a registering node's CSR; returns the certificate and when it ends.
    pub fn sign_node(&self, csr: &[u8], node: &str) -> Result<(String, i64), String> {
        let pem = self
            .ca
            .sign_csr(
                csr,
                &Subject {
                    role: Role::Node,
                    name: node,
                    dns_names: vec![node.to_string()],
                    ttl: self.node_cert_ttl,
                },
            )
            .map_err(|e| e.to_string())?;
        Ok((pem, now_secs() + self.node_cert_ttl.as_secs() as i64))
    }
}

/// A bundle for a person (`cellmaster admin-cert`), signed by `ca`.
pub fn person_bundle(
    ca: &CellCa,
    role: Role,
    name: &str,
    ttl: Duration,
) -> Result<Credentials, String> {
    let (cert_pem, key_pem) = ca
        .issue_with_key(&Subject {
            role,
            name,
            dns_names: Vec::new(),
            ttl,
        })
        .map_err(|e| e.to_string())?;
    Ok(Credentials {
        ca_pem: ca.cert_pem().to_string(),
        cert_pem,
        key_pem,
    })
}

/// Fills `buf` from the kernel's random source: join tokens, the image signing key.
pub fn random_bytes(buf: &mut [u8]) -> std::io::Result<()> {
    std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, buf))
}

/// A new token: its text (`<id>.<secret>`, shown once) and the row the store keeps.
pub fn new_token(
    ttl: Duration,
    uses: u32,
    node: &str,
    pxe: bool,
) -> Result<(String, JoinToken), String> {
    let mut bytes = [0u8; 20];
    random_bytes(&mut bytes).map_err(|e| format!("random bytes: {e}"))?;
    let id = hex(&bytes[..4]);
    let secret = hex(&bytes[4..]);
    let text = format!("{id}.{secret}");
    let row = JoinToken {
        id,
        secret_sha256: sha256_hex(secret.as_bytes()),
        expires_at: now_secs() + ttl.as_secs() as i64,
        uses_left: uses,
        node: node.to_string(),
        pxe_text: pxe.then(|| text.clone()),
    };
    Ok((text, row))
}

/// `<id>.<secret>` into the id and the secret's hash.
pub fn parse_token(text: &str) -> Option<(&str, String)> {
    let (id, secret) = text.split_once('.')?;
    let ok = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    (ok(id, 8) && ok(secret, 32)).then(|| (id, sha256_hex(secret.as_bytes())))
}

/// Whether a registration may go on: the node's own valid certificate (a renewal), or a
/// join token that is known, unexpired, not used up and (if bound) for this node. A
/// token's use is counted here.
pub fn admit(
    store: &dyn Store,
    req: &pb::RegisterRequest,
    node: &str,
    peer: Option<&Peer>,
) -> Result<&'static str, Status> {
    if let Some(id) = peer.and_then(|p| p.identity.as_ref())
        && id.role == Role::Node
        && id.name == node
    {
        return Ok("renewal");
    }
    if req.join_token.is_empty() {
        return Err(Status::unauthenticated(format!(
            "node {node}: no join token (celld.join=) and no certificate of this node"
        )));
    }
    let Some((id, hash)) = parse_token(&req.join_token) else {
        return Err(Status::unauthenticated(format!(
            "node {node}: join token is not <8 hex>.<32 hex>"
        )));
    };
    match store.use_token(id, &hash, node, now_secs()) {
        Ok(Ok(_left)) => Ok("join token"),
        Ok(Err(refusal)) => {
            let why = match refusal {
                TokenRefusal::Unknown => "unknown".to_string(),
                TokenRefusal::Expired(at) => format!("expired {} s ago", now_secs() - at),
                TokenRefusal::UsedUp => "used up".to_string(),
                TokenRefusal::OtherNode(n) => format!("issued for node {n}"),
            };
            Err(Status::unauthenticated(format!(
                "node {node}: join token {id} refused: {why}"
            )))
        }
        Err(e) => Err(Status::internal(format!("join token {id}: {e}"))),
    }
}

/// The fields of `CreateJoinToken`: a lifetime of 1 s to 30 days, 1 to 10000 uses.
pub fn check_token_request(req: &pb::CreateJoinTokenRequest) -> Result<(), Status> {
    if !(1..=30 * 24 * 3600).contains(&req.ttl_seconds) {
        return Err(Status::invalid_argument(format!(
            "ttl_seconds: {} is outside 1 s to 30 days",
            req.ttl_seconds
        )));
    }
    if !(1..=10_000).contains(&req.uses) {
        return Err(Status::invalid_argument(format!(
            "uses: {} is outside 1 to 10000",
            req.uses
        )));
    }
    Ok(())
}

/// `CreateJoinToken`: checked, stored, returned once.
pub fn create_token(
    state: &crate::server::MasterState,
    req: pb::CreateJoinTokenRequest,
) -> Result<pb::CreateJoinTokenResponse, Status> {
    if state.trust.is_none() {
        return Err(Status::failed_precondition(
            "this master runs with --insecure: nodes register without tokens",
        ));
    }
    check_token_request(&req)?;
    let (text, row) = new_token(
        Duration::from_secs(req.ttl_seconds.into()),
        req.uses,
        "",
        req.pxe,
    )
    .map_err(Status::internal)?;
    state
        .store
        .put_token(&row)
        .map_err(|e| Status::internal(e.to_string()))?;
    tracing::info!(token = %row.id, uses = req.uses, ttl_s = req.ttl_seconds, pxe = req.pxe, "join token created");
    Ok(pb::CreateJoinTokenResponse {
        token: text,
        expires_at: row.expires_at,
    })
}

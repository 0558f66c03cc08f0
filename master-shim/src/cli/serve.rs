//! `cellmaster serve`: flags checked, the store opened, the HTTP boot server (with
//! `--image-dir`) and the gRPC service started.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::{CliError, CliResult, Flags, failed, usage};
use crate::config::{self, ListedNode, MasterConfig};
use crate::images::{BOOT_ARTIFACTS, ImageError, ImageStore};
use crate::poll::PollPolicy;
use crate::server::{Advertise, MasterState, serve as serve_master};
use crate::store::{NodeRow, SqliteStore, Store, StoreError};

/// A node from the config into the store: its address and labels as listed, the rest as
/// the store has it (or empty, for a node never seen).
fn list_node(store: &dyn Store, n: &ListedNode) -> Result<(), StoreError> {
    match store.update_node(&n.id, &mut |row| {
        row.address = n.address.clone();
        row.labels = n.labels.clone();
    }) {
        Ok(_) => Ok(()),
        Err(StoreError::NotFound { .. }) => store
            .put_node(&NodeRow {
                id: n.id.clone(),
                address: n.address.clone(),
                labels: n.labels.clone(),
                ..Default::default()
            })
            .map(drop),
        Err(e) => Err(e),
    }
}

pub async fn serve(args: &[String]) -> CliResult {
    let f = Flags::parse(
        args,
        &[
            "--listen",
            "--poll-interval-ms",
            "--http",
            "--image-dir",
            "--state",
            "--config",
            "--advertise",
            "--node-cert-ttl",
        ],
        &[],
    )?;
    f.positional(&[])?;
    let state_file = PathBuf::from(f.get("--state").unwrap_or("/var/lib/cellmaster/state.db"));
    if let Some(dir) = state_file.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| failed(format!("--state {}: {e}", state_file.display())))?;
    }
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(&state_file)
            .map_err(|e| failed(format!("--state {}: {e}", state_file.display())))?,
    );
    let config = match f.get("--config") {
        None => MasterConfig::default(),
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| failed(format!("--config {path}: {e}")))?;
            config::parse(path, &text).map_err(|e| failed(e.to_string()))?
        }
    };
    let listen = f.get("--listen").unwrap_or("0.0.0.0:7000");
    // The flag wins over the file.
    let interval = f.number(
        "--poll-interval-ms",
        50..=600_000,
        config.poll_interval_ms.unwrap_or(2000),
    )?;
    let defaults = PollPolicy::default();
    let policy = PollPolicy {
        interval: Duration::from_millis(interval),
        // Below interval minus the round's spread (half), so a call ends before its next turn.
        timeout: Duration::from_millis((interval * 4 / 10).clamp(20, 5000)),
        down_after: config.down_after.unwrap_or(defaults.down_after),
        max_in_flight: config.max_in_flight.unwrap_or(defaults.max_in_flight),
        ..defaults
    };
    for n in &config.nodes {
        list_node(store.as_ref(), n)
            .map_err(|e| failed(format!("--config: node {}: {e}", n.id)))?;
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| failed(format!("--listen {listen}: {e}")))?;
    let local = listener
        .local_addr()
        .map_err(|e| failed(format!("--listen {listen}: {e}")))?;
    let state_dir = state_file
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let trust = if f.insecure {
        for _ in 0..3 {
            tracing::warn!("{}", celld_trust::INSECURE_WARNING);
        }
        None
    } else {
        let ttl = match f.get("--node-cert-ttl") {
            Some(t) => super::bundle::duration("--node-cert-ttl", t, 10..=90 * 86400)?,
            None => Duration::from_secs(86400),
        };
        let ca = crate::trust::load_or_create_ca(state_dir)
            .map_err(|e| failed(format!("cell CA beside --state: {e}")))?;
        let trust = crate::trust::MasterTrust::new(ca, ttl).map_err(failed)?;
        tracing::info!(fingerprint = %trust.fingerprint(), node_cert_ttl_s = ttl.as_secs(), "cell CA (nodes: celld.ca=)");
        Some(Arc::new(trust))
    };
    let images = Arc::new(ImageStore::open(state_dir).map_err(|e| {
        failed(format!(
            "images beside --state {}: {e}",
            state_file.display()
        ))
    })?);
    if let Some(image_dir) = f.get("--image-dir") {
        import_image(&images, std::path::Path::new(image_dir))?;
    }
    let mut advertise = None;
    if f.has("--http") || f.has("--image-dir") {
        let http = f.get("--http").unwrap_or("0.0.0.0:7080");
        let http_listener = tokio::net::TcpListener::bind(http)
            .await
            .map_err(|e| failed(format!("--http {http}: {e}")))?;
        let http_local = http_listener
            .local_addr()
            .map_err(|e| failed(format!("--http {http}: {e}")))?;
        // Nodes need a host they can reach: named, or the one the master listens on.
        let host = f.get("--advertise").map(str::to_string).or_else(|| {
            [http_local.ip(), local.ip()]
                .into_iter()
                .find(|ip| !ip.is_unspecified())
                .map(|ip| ip.to_string())
        });
        match host {
            Some(host) => {
                advertise = Some(Advertise {
                    host,
                    http_port: http_local.port(),
                    grpc_port: local.port(),
                })
            }
            None => tracing::warn!(
                "--http and --listen are on every address and --advertise is not given: \
                 rollouts cannot tell nodes where the images are"
            ),
        }
        tracing::info!(addr = %http, default_image = ?images.default_version(), "serving iPXE and images");
        let boot = Arc::new(crate::http::BootServer {
            images: images.clone(),
            store: store.clone(),
            grpc_port: local.port(),
            ca_fingerprint: trust.as_ref().map(|t| t.fingerprint()),
        });
        tokio::spawn(crate::http::serve_http(http_listener, boot));
    }
    let state = MasterState::new(policy, store, images, advertise, trust)
        .map_err(|e| failed(format!("--state {}: {e}", state_file.display())))?;
    tracing::info!(addr = %local, nodes = state.registry().records.len(), "cellmaster serving");
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    serve_master(state, listener, shutdown)
        .await
        .map_err(|e| CliError {
            exit: super::Exit::Failed,
            message: format!("serving: {e}"),
        })
}

/// `--image-dir`: a `cellimg build` output added to the image store at start (kept if
/// the same version is there already, refused if that version has other contents).
fn import_image(images: &ImageStore, dir: &std::path::Path) -> CliResult {
    let mut files = Vec::new();
    for name in ["manifest.json"].into_iter().chain(BOOT_ARTIFACTS) {
        let body = std::fs::read(dir.join(name)).map_err(|e| {
            usage(format!(
                "--image-dir {}: {name}: {e} (not a cellimg output?)",
                dir.display()
            ))
        })?;
        files.push((name.to_string(), body));
    }
    match images.add(&files) {
        Ok(image) => {
            tracing::info!(version = %image.version, "image from --image-dir added");
            Ok(())
        }
        Err(ImageError::Exists(v)) => match images.get(&v) {
            Ok(stored) if stored.manifest == files[0].1 => {
                tracing::info!(version = %v, "image from --image-dir is stored already");
                Ok(())
            }
            _ => Err(failed(format!(
                "--image-dir {}: version {v} is stored with other contents; build the new \
                 image with a new version",
                dir.display()
            ))),
        },
        Err(e) => Err(failed(format!("--image-dir {}: {e}", dir.display()))),
    }
}

//! `cellmaster serve`: flags checked, the store opened, the HTTP boot server (with
//! `--image-dir`) and the gRPC service started.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::{CliError, CliResult, Flags, failed, usage};
use crate::config::{self, ListedNode, MasterConfig};
use crate::poll::PollPolicy;
use crate::server::{MasterState, serve as serve_master};
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
    if let Some(image_dir) = f.get("--image-dir") {
        let dir = PathBuf::from(image_dir);
        if !dir.join("vmlinuz").is_file() || !dir.join("initramfs.cpio.gz").is_file() {
            return Err(usage(format!(
                "--image-dir {image_dir}: not a cellimg output (no vmlinuz, initramfs.cpio.gz)"
            )));
        }
        let http = f.get("--http").unwrap_or("0.0.0.0:7080");
        let http_listener = tokio::net::TcpListener::bind(http)
            .await
            .map_err(|e| failed(format!("--http {http}: {e}")))?;
        tracing::info!(addr = %http, image = image_dir, "serving iPXE and the image");
        let boot = Arc::new(crate::http::BootServer {
            image_dir: dir,
            grpc_port: local.port(),
        });
        tokio::spawn(crate::http::serve_http(http_listener, boot));
    } else if f.has("--http") {
        return Err(usage("--http needs --image-dir (the artifacts it serves)"));
    }
    let state = MasterState::new(policy, store)
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

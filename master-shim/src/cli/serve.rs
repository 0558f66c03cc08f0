//! `cellmaster serve`: flags checked, the store opened, the HTTP boot server (with
//! `--image-dir`) and the gRPC service started.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::{CliError, CliResult, Flags, failed, usage};
use crate::poll::PollPolicy;
use crate::server::{MasterState, serve as serve_master};
use crate::store::{SqliteStore, Store};

pub async fn serve(args: &[String]) -> CliResult {
    let f = Flags::parse(
        args,
        &[
            "--listen",
            "--poll-interval-ms",
            "--http",
            "--image-dir",
            "--state",
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
    let listen = f.get("--listen").unwrap_or("0.0.0.0:7000");
    let interval = f.number("--poll-interval-ms", 50..=600_000, 2000)?;
    let policy = PollPolicy {
        interval: Duration::from_millis(interval),
        // Below interval minus the round's spread (half), so a call ends before its next turn.
        timeout: Duration::from_millis((interval * 4 / 10).clamp(20, 5000)),
        ..Default::default()
    };
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

//! `cellmaster`: the thin master of a celld cell, and its admin CLI.
//!
//!   cellmaster serve [--listen ADDR] [--poll-interval-ms N]
//!   cellmaster nodes [--master ADDR] [--json]

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use celld_proto::v1 as pb;
use cellmaster::poll::PollPolicy;
use cellmaster::server::{MasterState, serve};

const USAGE: &str = "usage:
  cellmaster serve [--listen ADDR] [--poll-interval-ms N] [--http ADDR --image-dir DIR]
                   (defaults 0.0.0.0:7000, 2000 ms, 0.0.0.0:7080; HTTP only with --image-dir)
  cellmaster nodes [--master ADDR] [--json]                 (default 127.0.0.1:7000)
  cellmaster submit JOB.toml [--master ADDR]
  cellmaster tasks [--master ADDR] [--json]
serve also takes --state FILE (default /var/lib/cellmaster/state.db, SQLite).";

/// Flags as (name, value); `--json` has no value.
fn flags(args: &[String], known: &[&str]) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--json" && known.contains(&"--json") {
            out.push((a.clone(), String::new()));
            continue;
        }
        if !known.contains(&a.as_str()) {
            bail!("unknown argument {a:?}\n{USAGE}");
        }
        let v = it.next().with_context(|| format!("{a} needs a value"))?;
        out.push((a.clone(), v.clone()));
    }
    Ok(out)
}

fn get<'a>(f: &'a [(String, String)], name: &str, default: &'a str) -> &'a str {
    f.iter()
        .rev()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or(default)
}

async fn cmd_serve(args: &[String]) -> Result<()> {
    let f = flags(
        args,
        &[
            "--listen",
            "--poll-interval-ms",
            "--http",
            "--image-dir",
            "--state",
        ],
    )?;
    let state_file = std::path::PathBuf::from(get(&f, "--state", "/var/lib/cellmaster/state.db"));
    if let Some(dir) = state_file.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("--state {}", state_file.display()))?;
    }
    let store: std::sync::Arc<dyn cellmaster::store::Store> = std::sync::Arc::new(
        cellmaster::store::SqliteStore::open(&state_file)
            .with_context(|| format!("--state {}", state_file.display()))?,
    );
    let listen = get(&f, "--listen", "0.0.0.0:7000");
    let interval: u64 = get(&f, "--poll-interval-ms", "2000")
        .parse()
        .ok()
        .filter(|ms| (50..=600_000).contains(ms))
        .context("--poll-interval-ms: a number of milliseconds in 50..=600000")?;
    let policy = PollPolicy {
        interval: Duration::from_millis(interval),
        // Below interval minus the round's spread (half), so a call ends before its next turn.
        timeout: Duration::from_millis((interval * 4 / 10).clamp(20, 5000)),
        ..Default::default()
    };
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("--listen {listen}"))?;
    let grpc_port = listener.local_addr()?.port();
    tracing::info!(addr = %listener.local_addr()?, "cellmaster serving");
    let image_dir = get(&f, "--image-dir", "");
    if !image_dir.is_empty() {
        let dir = std::path::PathBuf::from(image_dir);
        if !dir.join("vmlinuz").is_file() || !dir.join("initramfs.cpio.gz").is_file() {
            bail!("--image-dir {image_dir}: not a cellimg output (no vmlinuz, initramfs.cpio.gz)");
        }
        let http = get(&f, "--http", "0.0.0.0:7080");
        let http_listener = tokio::net::TcpListener::bind(http)
            .await
            .with_context(|| format!("--http {http}"))?;
        tracing::info!(addr = %http_listener.local_addr()?, image = image_dir, "serving iPXE and the image");
        let boot = std::sync::Arc::new(cellmaster::http::BootServer {
            image_dir: dir,
            grpc_port,
        });
        tokio::spawn(cellmaster::http::serve_http(http_listener, boot));
    }
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    serve(MasterState::new(policy, store), listener, shutdown).await?;
    Ok(())
}

async fn master_client(
    master: &str,
) -> Result<pb::master_client::MasterClient<tonic::transport::Channel>> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{master}"))?
        .connect_timeout(Duration::from_secs(3))
        .connect()
        .await
        .with_context(|| format!("cannot reach the master at {master}"))?;
    Ok(pb::master_client::MasterClient::new(channel))
}

fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", s.message())
}

async fn cmd_submit(args: &[String]) -> Result<()> {
    let (file, rest) = args.split_first().context("submit needs a job file")?;
    let f = flags(rest, &["--master"])?;
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {file}"))?;
    let r = master_client(get(&f, "--master", "127.0.0.1:7000"))
        .await?
        .submit_job(pb::SubmitJobRequest {
            job_toml: text,
            file_name: file.clone(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    println!("job {} submitted: {}", r.job, r.tasks.join(" "));
    Ok(())
}

async fn cmd_tasks(args: &[String]) -> Result<()> {
    let f = flags(args, &["--master", "--json"])?;
    let tasks = master_client(get(&f, "--master", "127.0.0.1:7000"))
        .await?
        .list_cell_tasks(pb::ListCellTasksRequest {})
        .await
        .map_err(status_error)?
        .into_inner()
        .tasks;
    if f.iter().any(|(k, _)| k == "--json") {
        let rows: Vec<serde_json::Value> = tasks
            .iter()
            .map(|t| {
                serde_json::json!({"id": t.id, "job": t.job, "node": t.node,
                    "state": t.state, "reason": t.reason, "priority": t.priority})
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<20} {:<14} {:<20} {:<10} REASON",
        "TASK", "JOB", "NODE", "STATE"
    );
    for t in &tasks {
        let node = if t.node.is_empty() { "-" } else { &t.node };
        println!(
            "{:<20} {:<14} {:<20} {:<10} {}",
            t.id, t.job, node, t.state, t.reason
        );
    }
    Ok(())
}

async fn cmd_nodes(args: &[String]) -> Result<()> {
    let f = flags(args, &["--master", "--json"])?;
    let master = get(&f, "--master", "127.0.0.1:7000");
    let json = f.iter().any(|(k, _)| k == "--json");
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{master}"))?
        .connect_timeout(Duration::from_secs(3))
        .connect()
        .await
        .with_context(|| format!("cannot reach the master at {master}"))?;
    let nodes = pb::master_client::MasterClient::new(channel)
        .list_nodes(pb::ListNodesRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))?
        .into_inner()
        .nodes;
    if json {
        let rows: Vec<serde_json::Value> = nodes
            .iter()
            .map(|n| {
                serde_json::json!({
                    "id": n.id, "address": n.address, "liveness": n.liveness,
                    "machine_id": n.machine_id, "boot_id": n.boot_id,
                    "image_version": n.image_version, "celld_version": n.celld_version,
                    "labels": n.labels, "tasks": n.tasks, "cordoned": n.cordoned,
                    "missed_polls": n.missed_polls, "last_reply_ms_ago": n.last_reply_ms_ago,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<20} {:<22} {:<8} {:<12} {:>5} {:>8}",
        "NODE", "ADDRESS", "STATE", "IMAGE", "TASKS", "MISSED"
    );
    for n in &nodes {
        println!(
            "{:<20} {:<22} {:<8} {:<12} {:>5} {:>8}",
            n.id,
            n.address,
            n.liveness,
            if n.image_version.is_empty() {
                "-"
            } else {
                &n.image_version
            },
            n.tasks,
            n.missed_polls
        );
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(tracing::Level::INFO)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("serve") => cmd_serve(&args[1..]).await,
        Some("nodes") => cmd_nodes(&args[1..]).await,
        Some("submit") => cmd_submit(&args[1..]).await,
        Some("tasks") => cmd_tasks(&args[1..]).await,
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cellmaster: {e:#}");
            ExitCode::FAILURE
        }
    }
}

//! `cellmaster image ...`, `reimage` and `rollout ...`: images into the master and rolled
//! over the fleet, with progress (a bar on a terminal).

use std::io::IsTerminal;
use std::time::Duration;

use celld_proto::v1 as pb;
use serde_json::json;

use super::{CliError, CliResult, Exit, Flags, failed, from_status, usage};

/// Bytes per upload message (under the master's 1 MiB limit).
const CHUNK: usize = 256 << 10;

pub async fn image(rest: &[String]) -> CliResult {
    let Some((sub, rest)) = rest.split_first() else {
        return Err(usage("image add DIR | image list"));
    };
    match sub.as_str() {
        "add" => {
            let f = Flags::parse(rest, &["--master"], &["--default"])?;
            let dir = std::path::PathBuf::from(&f.positional(&["DIR"])?[0]);
            let mut chunks = Vec::new();
            for name in ["manifest.json", "vmlinuz", "initramfs.cpio.gz"] {
                let body = std::fs::read(dir.join(name)).map_err(|e| {
                    failed(format!(
                        "{}: {e} (not a cellimg output?)",
                        dir.join(name).display()
                    ))
                })?;
                for (i, piece) in body.chunks(CHUNK).enumerate() {
                    chunks.push(pb::ImageChunk {
                        file: name.into(),
                        data: piece.to_vec(),
                        make_default: i == 0 && f.has("--default"),
                    });
                }
            }
            let r = f
                .master()
                .await?
                .add_image(tokio_stream::iter(chunks))
                .await
                .map_err(from_status)?
                .into_inner();
            let i = r.image.unwrap_or_default();
            println!(
                "image {} added ({} MiB to boot){}",
                i.version,
                i.boot_bytes >> 20,
                if i.is_default { ", the default" } else { "" }
            );
            Ok(())
        }
        "list" => {
            let f = Flags::parse(rest, &["--master"], &["--json"])?;
            f.positional(&[])?;
            let r = f
                .master()
                .await?
                .list_images(pb::ListImagesRequest {})
                .await
                .map_err(from_status)?
                .into_inner();
            if f.has("--json") {
                let images: Vec<_> = r
                    .images
                    .iter()
                    .map(|i| json!({"version": i.version, "boot_bytes": i.boot_bytes,
                        "default": i.is_default, "nodes": i.nodes, "kernel_cmdline": i.kernel_cmdline}))
                    .collect();
                return super::show::print_json(
                    &json!({"master_key": r.master_key, "images": images}),
                );
            }
            println!("master key: {}\n", r.master_key);
            let mut t = super::show::Table::new(&["VERSION", "DEFAULT", "NODES", "SIZE"]);
            for i in &r.images {
                t.row(vec![
                    i.version.clone(),
                    if i.is_default {
                        "yes".into()
                    } else {
                        "".into()
                    },
                    i.nodes.to_string(),
                    format!("{:.1} MiB", i.boot_bytes as f64 / (1 << 20) as f64),
                ]);
            }
            t.print();
            Ok(())
        }
        other => Err(usage(format!(
            "image {other:?}: image add DIR | image list"
        ))),
    }
}

fn seconds_ms(f: &Flags, name: &str) -> Result<u32, CliError> {
    Ok((f.number(name, 1..=86_400, 0)? * 1000) as u32)
}

pub async fn reimage(rest: &[String]) -> CliResult {
    let f = Flags::parse(
        rest,
        &[
            "--master",
            "--to",
            "--nodes",
            "--max-unavailable",
            "--drain-timeout",
            "--ready-timeout",
        ],
        &["--detach"],
    )?;
    f.positional(&[])?;
    let to = f
        .get("--to")
        .ok_or_else(|| usage("reimage needs --to VERSION"))?
        .to_string();
    let max_unavailable = match f.get("--max-unavailable") {
        Some("0") => {
            return Err(usage(
                "--max-unavailable 0 would never reimage anything: at least 1",
            ));
        }
        _ => f.number("--max-unavailable", 1..=10_000, 1)? as u32,
    };
    let mut m = f.master().await?;
    let r = m
        .start_rollout(pb::StartRolloutRequest {
            to_version: to,
            selector: f.get("--nodes").unwrap_or("").to_string(),
            max_unavailable,
            drain_timeout_ms: seconds_ms(&f, "--drain-timeout")?,
            ready_timeout_ms: seconds_ms(&f, "--ready-timeout")?,
        })
        .await
        .map_err(from_status)?
        .into_inner();
    println!(
        "rollout {} to {}: {} node(s), {} at a time",
        r.id,
        r.to_version,
        r.nodes.len(),
        r.max_unavailable
    );
    if f.has("--detach") {
        return Ok(());
    }
    follow(&mut m).await
}

/// Prints progress until the rollout ends; fails when it did not end done.
async fn follow(m: &mut pb::master_client::MasterClient<tonic::transport::Channel>) -> CliResult {
    let mut last = String::new();
    loop {
        let r = m
            .get_rollout(pb::GetRolloutRequest {})
            .await
            .map_err(from_status)?
            .into_inner();
        let line = progress_line(&r);
        if line != last {
            println!("{line}");
            last = line;
        }
        match r.state.as_str() {
            "done" => return Ok(()),
            "running" | "paused" => {}
            _ => {
                return Err(CliError {
                    exit: Exit::Failed,
                    message: format!("rollout {} {}: {}", r.id, r.state, r.message),
                });
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn progress_line(r: &pb::RolloutStatus) -> String {
    let done = r.nodes.iter().filter(|n| n.phase == "done").count();
    let busy: Vec<String> = r
        .nodes
        .iter()
        .filter(|n| ["draining", "reimaging", "booting"].contains(&n.phase.as_str()))
        .map(|n| format!("{} {}", n.node, n.phase))
        .collect();
    format!(
        "{} {done}/{} on {} [{}] {}",
        bar(done, r.nodes.len()),
        r.nodes.len(),
        r.to_version,
        r.state,
        if busy.is_empty() {
            r.message.clone()
        } else {
            busy.join(", ")
        }
    )
}

fn bar(done: usize, total: usize) -> String {
    const WIDTH: usize = 20;
    let filled = (done * WIDTH).checked_div(total).unwrap_or(WIDTH);
    format!("[{}{}]", "#".repeat(filled), "-".repeat(WIDTH - filled))
}

pub async fn rollout(rest: &[String]) -> CliResult {
    use pb::control_rollout_request::Action;
    let Some((sub, rest)) = rest.split_first() else {
        return Err(usage("rollout status | pause | resume | abort"));
    };
    let action = match sub.as_str() {
        "status" => None,
        "pause" => Some(Action::Pause),
        "resume" => Some(Action::Resume),
        "abort" => Some(Action::Abort),
        other => {
            return Err(usage(format!(
                "rollout {other:?}: rollout status | pause | resume | abort"
            )));
        }
    };
    let f = Flags::parse(rest, &["--master"], &["--json", "--watch"])?;
    f.positional(&[])?;
    let mut m = f.master().await?;
    let r = match action {
        Some(a) => {
            m.control_rollout(pb::ControlRolloutRequest { action: a as i32 })
                .await
        }
        None => m.get_rollout(pb::GetRolloutRequest {}).await,
    }
    .map_err(from_status)?
    .into_inner();
    if f.has("--json") {
        let nodes: Vec<_> = r
            .nodes
            .iter()
            .map(|n| json!({"node": n.node, "from_version": n.from_version, "phase": n.phase, "message": n.message}))
            .collect();
        return super::show::print_json(&json!({"id": r.id, "to_version": r.to_version,
            "state": r.state, "message": r.message, "max_unavailable": r.max_unavailable, "nodes": nodes}));
    }
    if std::io::stdout().is_terminal() {
        println!("{}", progress_line(&r));
    }
    println!(
        "rollout {} to {}: {} ({})",
        r.id, r.to_version, r.state, r.message
    );
    let mut t = super::show::Table::new(&["NODE", "FROM", "PHASE", "MESSAGE"]);
    for n in &r.nodes {
        t.row(vec![
            n.node.clone(),
            n.from_version.clone(),
            n.phase.clone(),
            n.message.clone(),
        ]);
    }
    t.print();
    if f.has("--watch") {
        return follow(&mut m).await;
    }
    Ok(())
}

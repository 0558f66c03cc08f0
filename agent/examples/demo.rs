//! Drives one celld: starts a few tasks from a busybox rootfs (a well-behaved one, a
//! memory hog, one that tries to escape), and prints what the node reports about them.
//!
//!   cargo run --example demo -- [ADDR] [ROOTFS] [NODE_ID]
//!
//! With `$CELLMASTER_BUNDLE` (an operator or admin bundle from `cellmaster admin-cert`)
//! it calls the node over mutual TLS, expecting a certificate for NODE_ID; without it, in
//! plain text (a celld started with `--insecure`).

use std::time::Duration;

use celld_proto::v1 as pb;
use celld_proto::v1::node_client::NodeClient;

fn spec(id: &str, rootfs: &str, memory: u64, argv: &[&str]) -> pb::TaskSpec {
    pb::TaskSpec {
        id: id.into(),
        // No job: tasks started on a node by hand. A master that polls this node leaves
        // them alone (it kills tasks of jobs it does not know).
        job: String::new(),
        argv: argv.iter().map(|s| s.to_string()).collect(),
        rootfs: rootfs.into(),
        resources: Some(pb::Resources {
            memory_bytes: memory,
            cpu_millis: 100,
            pids_max: 32,
        }),
        kill_grace_ms: 1000,
        ..Default::default()
    }
}

fn name<T: std::fmt::Debug>(v: Result<T, prost::UnknownEnumValue>) -> String {
    v.map(|v| format!("{v:?}")).unwrap_or_else(|_| "?".into())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let addr = args.get(1).cloned().unwrap_or("127.0.0.1:7100".into());
    let rootfs = args
        .get(2)
        .cloned()
        .unwrap_or("/var/lib/celld-demo/rootfs".into());
    let endpoint = celld_trust::client::endpoint(&addr, Duration::from_secs(5))?;
    let tls = match std::env::var_os("CELLMASTER_BUNDLE") {
        None => None,
        Some(path) => {
            let node = args
                .get(3)
                .ok_or("NODE_ID: needed with $CELLMASTER_BUNDLE")?;
            Some(celld_trust::Bundle::read(path.as_ref())?.client_tls(node)?)
        }
    };
    let channel = celld_trust::client::connect(endpoint, tls.as_ref()).await?;
    let mut node = NodeClient::new(channel);
    let tasks = [
        spec(
            "hello",
            &rootfs,
            16 << 20,
            &["sh", "-c", "echo hello from $(hostname), pid $$; sleep 3"],
        ),
        // Doubles a string until the 32 MiB limit stops it.
        spec(
            "hog",
            &rootfs,
            32 << 20,
            &["sh", "-c", "x=0123456789; while :; do x=$x$x; done"],
        ),
        // Tries to mount, to poke the kernel, and looks around.
        spec(
            "escape",
            &rootfs,
            16 << 20,
            &[
                "sh",
                "-c",
                "mount -t tmpfs none /mnt; echo h > /proc/sysrq-trigger; \
                 echo processes seen: $(ls /proc | grep -c '^[0-9]'); grep CapEff /proc/self/status",
            ],
        ),
    ];
    for t in tasks {
        let id = t.id.clone();
        let r = node.run_task(pb::RunTaskRequest { spec: Some(t) }).await;
        match r {
            Ok(_) => println!("started {id}"),
            Err(e) => println!("{id}: {}", e.message()),
        }
    }
    // Until every task has ended (the hog needs its limit to be reached), at most 30 s.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let status = node
            .get_status(pb::GetStatusRequest::default())
            .await?
            .into_inner();
        let live = status.tasks.iter().any(|t| {
            t.state != pb::TaskState::Dead as i32 && t.state != pb::TaskState::Evicted as i32
        });
        if !live || std::time::Instant::now() > deadline {
            break status;
        }
    };
    println!(
        "\nnode {} ({}), kernel {}, cgroup {}, landlock ABI {}, generation {}",
        status
            .identity
            .as_ref()
            .map(|i| i.hostname.as_str())
            .unwrap_or(""),
        status.mode,
        status.kernel_release,
        status.cgroup_version,
        status.landlock_abi,
        status.generation
    );
    println!(
        "\n{:<8} {:<8} {:<16} {:>6} {:>10} {:>9} {:>5}",
        "TASK", "STATE", "REASON", "EXIT", "MEM(KiB)", "CPU(ms)", "OOM"
    );
    for t in &status.tasks {
        let u = t.usage.unwrap_or_default();
        println!(
            "{:<8} {:<8} {:<16} {:>6} {:>10} {:>9} {:>5}",
            t.id,
            name(pb::TaskState::try_from(t.state)),
            name(pb::TaskReason::try_from(t.reason)),
            if t.signal != 0 {
                format!("sig{}", t.signal)
            } else {
                t.exit_code.to_string()
            },
            u.memory_peak_bytes / 1024,
            u.cpu_usec / 1000,
            u.oom_kills
        );
    }
    for id in ["hello", "escape"] {
        println!("\n-- logs of {id}");
        let Ok(logs) = node
            .task_logs(pb::TaskLogsRequest {
                id: id.into(),
                follow: false,
                tail: 20,
            })
            .await
        else {
            println!("(no such task)");
            continue;
        };
        let mut logs = logs.into_inner();
        while let Some(l) = logs.message().await? {
            println!("{}", String::from_utf8_lossy(&l.line));
        }
    }
    Ok(())
}

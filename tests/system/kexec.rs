//! Reimage by kexec on a real node: boot image A by kernel+initrd with the test's master
//! key on the command line, serve image B's kernel and initramfs from the host, and ask
//! the node to reimage into B with B's manifest signed by that key. The node must come
//! back as B with a new boot id, without the firmware (QEMU runs with -no-reboot, so a
//! firmware reboot would end the test). A forged manifest first must change nothing.
//!
//! A is `CELLD_ARTIFACTS`, B is `CELLD_ARTIFACTS_NEXT` (tests/run-all.sh builds both).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use celld_proto::v1 as pb;
use celld_proto::v1::node_client::NodeClient;
use celld_system_tests::{Artifacts, BootPath, Vm, artifacts, artifacts_named, save_console};
use ed25519_dalek::{Signer, SigningKey};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;

const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

/// Serves the files of `dir` over HTTP/1.1 on the host's loopback, which QEMU's user
/// network shows the guest as 10.0.2.2. Returns the port.
async fn serve_dir(dir: PathBuf) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (mut conn, _) = listener.accept().await.unwrap();
            let dir = dir.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let path = head
                    .split(' ')
                    .nth(1)
                    .unwrap_or("/")
                    .trim_start_matches('/');
                let body = match std::fs::read(dir.join(path)) {
                    Ok(b) if !path.contains("..") => b,
                    _ => {
                        let _ = conn
                            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                            .await;
                        return;
                    }
                };
                let h = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = conn.write_all(h.as_bytes()).await;
                let _ = conn.write_all(&body).await;
            });
        }
    });
    port
}

fn random_key() -> SigningKey {
    let mut seed = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut seed))
        .unwrap();
    SigningKey::from_bytes(&seed)
}

/// A client whose calls may take as long as a download over QEMU's emulated network.
async fn slow_client(port: u16) -> NodeClient<Channel> {
    let ch = Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .timeout(Duration::from_secs(120))
        .connect()
        .await
        .unwrap();
    NodeClient::new(ch)
}

/// A node booted from image A that trusts a fresh key, and a request, signed by that
/// key, to move to image B served from the host.
struct Setup {
    vm: Vm,
    before: pb::NodeStatus,
    request: pb::ReimageRequest,
    from: Artifacts,
    to: Artifacts,
}

async fn boot_a_trusting_node() -> Setup {
    let from = artifacts();
    let to = artifacts_named("CELLD_ARTIFACTS_NEXT");
    assert_ne!(
        from.version, to.version,
        "CELLD_ARTIFACTS and CELLD_ARTIFACTS_NEXT must be two versions"
    );
    let key = random_key();
    let key_hex: String = key
        .verifying_key()
        .as_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let trust = format!("celld.master_key={key_hex}");
    let mut vm = Vm::boot_with(BootPath::KernelInitrd, &from, &trust);
    let (_, before) = vm.connect(BOOT_TIMEOUT).await;
    assert_eq!(before.image_version, from.version, "{before:#?}");
    assert!(
        before.config_errors.is_empty(),
        "{:?}",
        before.config_errors
    );
    let port = serve_dir(to.dir.clone()).await;
    let manifest = std::fs::read(to.dir.join("manifest.json")).unwrap();
    let request = pb::ReimageRequest {
        version: to.version.clone(),
        kernel_url: format!("http://10.0.2.2:{port}/vmlinuz"),
        initramfs_url: format!("http://10.0.2.2:{port}/initramfs.cpio.gz"),
        cmdline: format!("{} {trust}", to.cmdline),
        manifest_signature: key.sign(&manifest).to_bytes().to_vec(),
        manifest,
    };
    Setup {
        vm,
        before,
        request,
        from,
        to,
    }
}

#[tokio::test]
async fn a_node_reimages_into_a_signed_image_by_kexec() {
    let Setup {
        mut vm,
        before,
        request,
        from,
        to,
    } = boot_a_trusting_node().await;
    let mut client = slow_client(vm.port).await;

    // Signed by someone else: refused, and the node stays as it was.
    let mut forged = request.clone();
    forged.manifest_signature = random_key().sign(&request.manifest).to_bytes().to_vec();
    let e = client.reimage(forged).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let still = client
        .get_status(pb::GetStatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (still.boot_id.as_str(), still.image_version.as_str()),
        (before.boot_id.as_str(), from.version.as_str())
    );
    assert_eq!(
        still.last_reimage_error,
        "manifest signature does not verify with this node's master_key"
    );

    // A task that takes a second to stop on SIGTERM: the reimage must give it that.
    let task = pb::TaskSpec {
        id: "sleeper".into(),
        argv: [
            "sh",
            "-c",
            "trap 'sleep 1; exit 0' TERM; echo trapping; while :; do sleep 0.2; done",
        ]
        .map(String::from)
        .to_vec(),
        rootfs: "/rootfs/busybox".into(),
        resources: Some(pb::Resources {
            memory_bytes: 16 << 20,
            cpu_millis: 200,
            pids_max: 16,
        }),
        kill_grace_ms: 10_000,
        ..Default::default()
    };
    client
        .run_task(pb::RunTaskRequest { spec: Some(task) })
        .await
        .unwrap();
    // The shell is PID 1 of its namespace: SIGTERM before its trap is set would be lost.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut logs = client
            .task_logs(pb::TaskLogsRequest {
                id: "sleeper".into(),
                follow: false,
                tail: 0,
            })
            .await
            .unwrap()
            .into_inner();
        let mut seen = false;
        while let Some(l) = logs.message().await.unwrap() {
            seen |= l.line == b"trapping";
        }
        if seen {
            break;
        }
        assert!(Instant::now() < deadline, "the task never set its trap");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let asked = Instant::now();
    let reply = client.reimage(request).await;
    let fetched = asked.elapsed();
    let reply = match reply {
        Ok(r) => r.into_inner(),
        Err(e) => panic!("Reimage refused: {e:?}\nconsole:\n{}", vm.console()),
    };
    assert_eq!(
        reply.message,
        format!(
            "{} loaded; stopping tasks and rebooting by kexec",
            to.version
        ),
        "the node could not stage the new kernel; console:\n{}",
        vm.console()
    );

    // The old celld answers for a moment while it stops; wait for the new boot.
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let after = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let (_, s) = vm.connect(left).await;
        if s.boot_id != before.boot_id {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the node never rebooted; console:\n{}",
            vm.console()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let total = asked.elapsed();
    save_console(&vm, "kexec");
    assert_eq!(after.image_version, to.version, "{after:#?}");
    assert_eq!(after.mode, "pid1");
    assert!(after.config_errors.is_empty(), "{:?}", after.config_errors);
    assert!(
        vm.console().contains("tasks stopped; syncing"),
        "the old image did not go down through its power path"
    );
    let console = vm.console();
    assert!(
        console
            .lines()
            .any(|l| l.contains("task_id=sleeper") && l.contains("NodeShutdown")),
        "the task was not stopped before the kexec; console:\n{console}"
    );
    assert!(
        !console.contains("grace period over"),
        "the task did not get its grace period; console:\n{console}"
    );
    println!(
        "reimage {} -> {}: download and checks {:.1} s, Reimage call to the new celld \
         answering {:.1} s (kexec and boot {:.1} s; QEMU TCG)",
        from.version,
        to.version,
        fetched.as_secs_f64(),
        total.as_secs_f64(),
        (total - fetched).as_secs_f64()
    );
}

#[tokio::test]
async fn where_the_kernel_refuses_kexec_the_node_reboots_by_firmware() {
    let Setup {
        mut vm, request, ..
    } = boot_a_trusting_node().await;
    let mut client = slow_client(vm.port).await;
    // The kernel's switch that makes kexec_file_load fail with EPERM until reboot.
    let applied = client
        .apply_sysctls(pb::ApplySysctlsRequest {
            sysctls: [("kernel.kexec_load_disabled".to_string(), "1".to_string())].into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(applied.results[0].error, "", "{applied:?}");
    let version = request.version.clone();
    let reply = client.reimage(request).await.unwrap().into_inner();
    assert_eq!(
        reply.message,
        format!(
            "{version} verified; stopping tasks and rebooting by firmware reboot \
             (kexec_file_load: EPERM)"
        )
    );
    // QEMU runs with -no-reboot: the firmware reboot ends it.
    let exit = vm.wait_exit(Duration::from_secs(60));
    save_console(&vm, "kexec-refused");
    assert!(
        exit.is_some(),
        "the node did not reboot; console:\n{}",
        vm.console()
    );
    assert!(vm.console().contains("kexec_file_load failed"));
}

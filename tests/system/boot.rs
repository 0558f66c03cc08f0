//! Boot the real image by every path a fleet uses and talk to celld over the network.

use std::time::Duration;

use celld_proto::v1 as pb;
use celld_system_tests::{BootPath, Vm, artifacts, save_console};

/// TCG is slow: a UEFI or PXE boot takes tens of seconds of wall time.
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

async fn boots_and_answers(
    path: BootPath,
) -> (
    Vm,
    celld_proto::v1::node_client::NodeClient<tonic::transport::Channel>,
) {
    let a = artifacts();
    let mut vm = Vm::boot(path, &a);
    let (client, status) = vm.connect(BOOT_TIMEOUT).await;
    assert_eq!(status.image_version, a.version, "{status:#?}");
    assert_eq!(status.mode, "pid1");
    assert_eq!(status.cgroup_version, "v2");
    assert!(status.boot_to_ready_seconds > 0.0);
    assert!(status.init_to_ready_seconds > 0.0);
    assert!(
        status.config_errors.is_empty(),
        "{:?}",
        status.config_errors
    );
    assert!(
        status
            .identity
            .as_ref()
            .is_some_and(|i| i.addresses.iter().any(|a| a.starts_with("eth0=10.0.2."))),
        "{status:#?}"
    );
    (vm, client)
}

async fn power_off(
    mut vm: Vm,
    mut client: celld_proto::v1::node_client::NodeClient<tonic::transport::Channel>,
    name: &str,
) {
    client.poweroff(pb::PoweroffRequest {}).await.unwrap();
    let exit = vm.wait_exit(Duration::from_secs(60));
    save_console(&vm, name);
    assert!(
        exit.is_some_and(|s| s.success()),
        "QEMU did not power off cleanly ({exit:?}); console:\n{}",
        vm.console()
    );
    assert!(vm.console().contains("tasks stopped; syncing"));
}

#[tokio::test]
async fn kernel_and_initrd_boot_runs_tasks_under_cgroup_v2_and_powers_off() {
    let (vm, mut client) = boots_and_answers(BootPath::KernelInitrd).await;
    let spec = |id: &str, memory: u64, argv: &[&str]| pb::TaskSpec {
        id: id.into(),
        argv: argv.iter().map(|s| s.to_string()).collect(),
        rootfs: "/rootfs/busybox".into(),
        resources: Some(pb::Resources {
            memory_bytes: memory,
            cpu_millis: 500,
            pids_max: 64,
        }),
        ..Default::default()
    };
    let run = |s: pb::TaskSpec| pb::RunTaskRequest { spec: Some(s) };
    client
        .run_task(run(spec(
            "hello",
            16 << 20,
            &[
                "sh",
                "-c",
                "echo hi from $(hostname); cat /proc/self/cgroup",
            ],
        )))
        .await
        .unwrap();
    client
        .run_task(run(spec(
            "hog",
            24 << 20,
            &["sh", "-c", "x=0123456789; while :; do x=$x$x; done"],
        )))
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let (hello, hog) = loop {
        let tasks = client
            .list_tasks(pb::ListTasksRequest::default())
            .await
            .unwrap()
            .into_inner()
            .tasks;
        let finished = |id: &str| {
            tasks
                .iter()
                .find(|t| t.id == id && t.state == pb::TaskState::Dead as i32)
                .cloned()
        };
        if let (Some(a), Some(b)) = (finished("hello"), finished("hog")) {
            break (a, b);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "tasks did not finish: {tasks:#?}\n{}",
            vm.console()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(hello.exit_code, 0, "{hello:#?}");
    assert_eq!(hog.reason, pb::TaskReason::OomKilled as i32, "{hog:#?}");
    let mut logs = client
        .task_logs(pb::TaskLogsRequest {
            id: "hello".into(),
            follow: false,
            tail: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = String::new();
    while let Some(l) = logs.message().await.unwrap() {
        out.push_str(&String::from_utf8_lossy(&l.line));
        out.push('\n');
    }
    // Its own hostname, and cgroup v2 seen from its own cgroup namespace.
    assert_eq!(out, "hi from hello\n0::/\n");
    power_off(vm, client, "kernel").await;
}

#[tokio::test]
async fn iso_boots_with_bios() {
    let (vm, client) = boots_and_answers(BootPath::IsoBios).await;
    power_off(vm, client, "iso-bios").await;
}

#[tokio::test]
async fn iso_boots_with_uefi() {
    let (vm, client) = boots_and_answers(BootPath::IsoUefi).await;
    power_off(vm, client, "iso-uefi").await;
}

#[tokio::test]
async fn pxe_boots_through_the_nic_rom() {
    let (vm, client) = boots_and_answers(BootPath::Pxe).await;
    power_off(vm, client, "pxe").await;
}

#[tokio::test]
async fn a_bad_command_line_value_boots_with_the_default_and_says_so() {
    let a = artifacts();
    let mut vm = Vm::boot_with(
        BootPath::KernelInitrd,
        &a,
        "celld.reserved_cpu_millis=lots celld.frobnicate=1",
    );
    let (client, status) = vm.connect(BOOT_TIMEOUT).await;
    assert_eq!(status.config_errors.len(), 2, "{:?}", status.config_errors);
    assert!(
        status
            .config_errors
            .iter()
            .any(|e| e.contains("reserved_cpu_millis"))
    );
    assert!(
        status
            .config_errors
            .iter()
            .any(|e| e.contains("frobnicate"))
    );
    assert!(vm.console().contains("frobnicate"), "not on the console");
    power_off(vm, client, "bad-cmdline").await;
}

#[tokio::test]
async fn ctrl_alt_del_reboots_gracefully() {
    let a = artifacts();
    let mut vm = Vm::boot(BootPath::KernelInitrd, &a);
    let _ = vm.connect(BOOT_TIMEOUT).await;
    vm.ctrl_alt_del();
    // -no-reboot: the reboot ends QEMU.
    let exit = vm.wait_exit(Duration::from_secs(60));
    save_console(&vm, "ctrl-alt-del");
    assert!(
        exit.is_some(),
        "no reboot after ctrl-alt-del; console:\n{}",
        vm.console()
    );
    let console = vm.console();
    assert!(console.contains("choice=Reboot"), "{console}");
    assert!(console.contains("tasks stopped; syncing"), "{console}");
}

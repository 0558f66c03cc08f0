//! Privileged tests: hostile tasks against the real spawn path of a running celld.

mod common;

use std::time::{Duration, Instant};

use celld_proto::v1 as pb;
use common::{Node, reason, state};

#[tokio::test]
async fn a_task_is_pid_1_and_sees_no_host_process() {
    let mut n = Node::start().await;
    let spec = n.spec(
        "pid1",
        &["sh", "-c", "echo self=$$; ls /proc | grep -c '^[0-9]'"],
    );
    let (t, out) = n.run_to_end(spec).await;
    assert_eq!(state(&t), pb::TaskState::Dead, "{out}");
    assert!(out.contains("self=1\n"), "{out}");
    let count: usize = out.lines().nth(1).unwrap().trim().parse().unwrap();
    assert!(count <= 3, "the task saw {count} processes: {out}");
}

#[tokio::test]
async fn a_task_has_its_own_hostname_and_only_loopback() {
    let mut n = Node::start().await;
    let spec = n.spec("named-task", &["sh", "-c", "hostname; cat /proc/net/dev"]);
    let (_, out) = n.run_to_end(spec).await;
    assert!(out.starts_with("named-task\n"), "{out}");
    let ifaces: Vec<&str> = out
        .lines()
        .skip(3)
        .filter_map(|l| l.split(':').next())
        .map(str::trim)
        .collect();
    assert_eq!(ifaces, ["lo"], "{out}");
}

#[tokio::test]
async fn dangerous_syscalls_fail_with_eperm() {
    let mut n = Node::start().await;
    let spec = n.spec("syscalls", &["/bin/celld-probe", "syscalls"]);
    let (t, out) = n.run_to_end(spec).await;
    assert_eq!(t.exit_code, 0, "{out}");
    for call in [
        "mount",
        "ptrace",
        "reboot",
        "init_module",
        "kexec_load",
        "unshare_user",
        "sethostname_after_drop",
    ] {
        assert!(
            out.contains(&format!("{call}=EPERM")),
            "{call} was not refused with EPERM:\n{out}"
        );
    }
}

#[tokio::test]
async fn capabilities_are_the_reduced_default_set() {
    let mut n = Node::start().await;
    let spec = n.spec(
        "caps",
        &["sh", "-c", "grep -E '^Cap(Eff|Bnd|Amb)' /proc/self/status"],
    );
    let (_, out) = n.run_to_end(spec).await;
    // The OCI default set: chown dac_override fowner fsetid kill setgid setuid setpcap
    // net_bind_service net_raw sys_chroot mknod audit_write setfcap.
    assert!(out.contains("CapEff:\t00000000a80425fb"), "{out}");
    assert!(out.contains("CapBnd:\t00000000a80425fb"), "{out}");
    assert!(out.contains("CapAmb:\t0000000000000000"), "{out}");
}

#[tokio::test]
async fn proc_sysrq_trigger_and_proc_sys_are_read_only() {
    let mut n = Node::start().await;
    let spec = n.spec(
        "sysrq",
        &[
            "sh",
            "-c",
            "echo h > /proc/sysrq-trigger; echo sysrq=$?; \
             echo 1 > /proc/sys/kernel/sysrq; echo sys=$?; \
             cat /proc/kcore | wc -c",
        ],
    );
    let (_, out) = n.run_to_end(spec).await;
    assert!(out.contains("sysrq=1"), "{out}");
    assert!(out.contains("sys=1"), "{out}");
    assert!(
        out.lines().any(|l| l.trim() == "0"),
        "kcore not masked: {out}"
    );
}

#[tokio::test]
async fn a_memory_hog_is_oom_killed() {
    let mut n = Node::start().await;
    let mut spec = n.spec("hog", &["/bin/celld-probe", "hog"]);
    spec.resources.as_mut().unwrap().memory_bytes = 32 << 20;
    let (t, out) = n.run_to_end(spec).await;
    assert_eq!(state(&t), pb::TaskState::Dead, "{out}");
    assert_eq!(reason(&t), pb::TaskReason::OomKilled, "{t:#?}");
    assert_eq!(t.signal, 9);
    assert!(t.usage.unwrap().oom_kills >= 1);
    let last = out.lines().rev().find(|l| l.starts_with("hog=")).unwrap();
    let mib: u64 = last[4..].trim_end_matches(" MiB").parse().unwrap();
    assert!(mib <= 32, "hog got {mib} MiB past a 32 MiB limit");
}

#[tokio::test]
async fn a_fork_bomb_is_held_at_pids_max_and_the_node_answers() {
    let mut n = Node::start().await;
    let mut spec = n.spec("forkbomb", &["/bin/celld-probe", "forkbomb"]);
    spec.resources.as_mut().unwrap().pids_max = 32;
    n.run(spec).await;
    n.wait_running("forkbomb").await;
    // Wait until the bomb has hit the limit.
    loop {
        let out = n.output("forkbomb").await;
        if out.lines().any(|l| !l.ends_with("refused=0")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let started = Instant::now();
    let status = n.status().await;
    assert!(started.elapsed() < Duration::from_secs(5));
    let t = status.tasks.iter().find(|t| t.id == "forkbomb").unwrap();
    let pids = t.usage.unwrap().pids;
    assert!(
        (2..=32).contains(&pids),
        "pids.current {pids} outside 2..=32"
    );
    n.kill("forkbomb", 100).await.unwrap();
    let t = n.wait_finished("forkbomb").await;
    assert_eq!(reason(&t), pb::TaskReason::Killed);
}

#[tokio::test]
async fn tasks_report_the_landlock_abi_in_force() {
    let mut n = Node::start().await;
    let spec = n.spec("ll", &["true"]);
    let (t, _) = n.run_to_end(spec).await;
    let kernel = celld::sys::landlock_abi();
    assert!(
        kernel > 0,
        "this kernel has no Landlock: the test cannot check it"
    );
    assert!(t.landlock_abi > 0 && t.landlock_abi <= kernel, "{t:#?}");
    let status = n.status().await;
    assert_eq!(status.landlock_abi, kernel);
}

#[tokio::test]
async fn landlock_denies_files_outside_the_task_tree() {
    common::require_root();
    // The very function the spawn path uses, in a fresh process so the restriction does
    // not stick to the test runner.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("inside"), "ok").unwrap();
    let probe = env!("CARGO_BIN_EXE_celld-probe");
    let out = std::process::Command::new(probe)
        .arg("landlock")
        .arg(dir.path())
        .arg(dir.path().join("inside"))
        .arg("/etc/hostname")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(out.contains("landlock_abi="), "{out}");
    assert!(out.contains("inside=2 bytes"), "{out}");
    assert!(out.contains("outside=EACCES"), "{out}");
}

#[tokio::test]
async fn a_readonly_rootfs_cannot_be_written() {
    let mut n = Node::start().await;
    let mut spec = n.spec(
        "ro",
        &[
            "sh",
            "-c",
            "touch /bin/x; echo root=$?; touch /tmp/x; echo tmp=$?",
        ],
    );
    spec.isolation = Some(pb::Isolation {
        readonly_rootfs: true,
        ..Default::default()
    });
    let (_, out) = n.run_to_end(spec).await;
    assert!(out.contains("root=1"), "{out}");
    assert!(out.contains("tmp=0"), "{out}");
}

#[tokio::test]
async fn a_task_runs_as_the_uid_it_asks_for() {
    let mut n = Node::start().await;
    let mut spec = n.spec(
        "uid",
        &["sh", "-c", "id -u; id -g; grep CapEff /proc/self/status"],
    );
    spec.isolation = Some(pb::Isolation {
        uid: Some(1000),
        gid: Some(1000),
        ..Default::default()
    });
    let (_, out) = n.run_to_end(spec).await;
    assert!(out.starts_with("1000\n1000\n"), "{out}");
    assert!(out.contains("CapEff:\t0000000000000000"), "{out}");
}

#[tokio::test]
async fn rlimits_apply_and_host_network_is_the_nodes() {
    let mut n = Node::start().await;
    let mut spec = n.spec(
        "limits",
        &["sh", "-c", "ulimit -n; cat /proc/net/dev | wc -l"],
    );
    spec.isolation = Some(pb::Isolation {
        network: pb::isolation::Network::Host as i32,
        rlimits: vec![pb::Rlimit {
            name: "RLIMIT_NOFILE".into(),
            soft: 123,
            hard: 456,
        }],
        ..Default::default()
    });
    let (_, out) = n.run_to_end(spec).await;
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("123"), "{out}");
    let host_ifaces = std::fs::read_to_string("/proc/net/dev")
        .unwrap()
        .lines()
        .count();
    assert_eq!(
        lines.next(),
        Some(host_ifaces.to_string().as_str()),
        "{out}"
    );
}

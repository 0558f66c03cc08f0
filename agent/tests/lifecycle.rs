//! Privileged tests of the Borg lifecycle over gRPC: kills with grace, logs, restarts,
//! drain, watch, idempotency, preemption, status.

mod common;

use std::time::{Duration, Instant};

use celld_proto::v1 as pb;
use common::{Node, reason, state};

#[tokio::test]
async fn kill_sends_sigterm_first_and_sigkill_after_the_grace_period() {
    let mut n = Node::start().await;
    // A task that exits cleanly on SIGTERM.
    let polite = n.spec(
        "polite",
        &[
            "sh",
            "-c",
            "trap 'echo got-term; exit 0' TERM; echo ready; while :; do sleep 0.1; done",
        ],
    );
    n.run(polite).await;
    n.wait_for("polite", Duration::from_secs(10), |_| true)
        .await;
    while !n.output("polite").await.contains("ready") {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    n.kill("polite", 10_000).await.unwrap();
    let t = n.wait_finished("polite").await;
    assert_eq!(reason(&t), pb::TaskReason::Killed);
    assert_eq!(t.exit_code, 0, "{t:#?}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(n.output("polite").await.contains("got-term"));

    // A task that ignores SIGTERM lives out its grace period, then gets SIGKILL.
    let stubborn = n.spec(
        "stubborn",
        &[
            "sh",
            "-c",
            "trap '' TERM; echo ready; while :; do sleep 0.1; done",
        ],
    );
    n.run(stubborn).await;
    while !n.output("stubborn").await.contains("ready") {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let asked = Instant::now();
    n.kill("stubborn", 1500).await.unwrap();
    let t = n.wait_finished("stubborn").await;
    let took = asked.elapsed();
    assert_eq!(reason(&t), pb::TaskReason::Killed);
    assert_eq!(t.signal, 9, "{t:#?}");
    assert!(
        took >= Duration::from_millis(1400),
        "SIGKILL came after {took:?}"
    );
}

#[tokio::test]
async fn logs_come_back_in_order_with_both_streams() {
    let mut n = Node::start().await;
    let spec = n.spec(
        "chatty",
        &[
            "sh",
            "-c",
            "for i in $(seq 1 500); do echo out-$i; done; echo err-last >&2",
        ],
    );
    let (t, _) = n.run_to_end(spec).await;
    assert_eq!(t.exit_code, 0);
    let lines = n.logs("chatty").await;
    let out: Vec<String> = lines
        .iter()
        .filter(|l| l.stream == pb::log_line::Stream::Stdout as i32)
        .map(|l| String::from_utf8_lossy(&l.line).into_owned())
        .collect();
    let want: Vec<String> = (1..=500).map(|i| format!("out-{i}")).collect();
    assert_eq!(out, want);
    assert!(lines.windows(2).all(|w| w[0].seq < w[1].seq));
    assert!(
        lines
            .iter()
            .any(|l| l.stream == pb::log_line::Stream::Stderr as i32 && l.line == b"err-last")
    );
    // tail
    let mut tail = n
        .client
        .task_logs(pb::TaskLogsRequest {
            id: "chatty".into(),
            follow: false,
            tail: 2,
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = 0;
    while tail.message().await.unwrap().is_some() {
        got += 1;
    }
    assert_eq!(got, 2);
}

#[tokio::test]
async fn follow_streams_new_lines_until_the_task_ends() {
    let mut n = Node::start().await;
    let spec = n.spec(
        "ticker",
        &[
            "sh",
            "-c",
            "for i in 1 2 3; do echo tick-$i; sleep 0.3; done",
        ],
    );
    n.run(spec).await;
    let mut stream = n
        .client
        .task_logs(pb::TaskLogsRequest {
            id: "ticker".into(),
            follow: true,
            tail: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    let done = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(l) = stream.message().await.unwrap() {
            got.push(String::from_utf8_lossy(&l.line).into_owned());
        }
    })
    .await;
    assert!(done.is_ok(), "follow did not end after the task: {got:?}");
    assert_eq!(got, ["tick-1", "tick-2", "tick-3"]);
}

#[tokio::test]
async fn on_failure_restarts_with_growing_backoff_up_to_the_limit() {
    let mut n = Node::start().await;
    let mut spec = n.spec("flaky", &["sh", "-c", "echo run; exit 3"]);
    spec.restart_policy = Some(pb::RestartPolicy {
        mode: pb::restart_policy::Mode::OnFailure as i32,
        initial_backoff_ms: 200,
        max_backoff_ms: 5000,
        max_restarts: 3,
    });
    n.run(spec).await;
    let t = n
        .wait_for("flaky", Duration::from_secs(30), |t| {
            t.restarts == 3 && t.state == pb::TaskState::Dead as i32
        })
        .await;
    assert_eq!(t.exit_code, 3);
    // Pending transitions after each death: their gaps grow 200, 400, 800 ms.
    let deaths: Vec<i64> = t
        .transitions
        .iter()
        .filter(|x| x.state == pb::TaskState::Dead as i32)
        .map(|x| x.at_unix_ms)
        .collect();
    let restarts: Vec<i64> = t
        .transitions
        .iter()
        .filter(|x| x.state == pb::TaskState::Pending as i32 && x.message == "restart")
        .map(|x| x.at_unix_ms)
        .collect();
    assert_eq!(restarts.len(), 3, "{t:#?}");
    let gaps: Vec<i64> = restarts.iter().zip(&deaths).map(|(r, d)| r - d).collect();
    for (gap, want) in gaps.iter().zip([200, 400, 800]) {
        assert!(*gap >= want - 20, "backoff gaps {gaps:?}");
    }
    tokio::time::sleep(Duration::from_millis(1800)).await;
    assert_eq!(
        n.task("flaky").await.restarts,
        3,
        "restarted past max_restarts"
    );
    let runs = n.output("flaky").await.matches("run").count();
    assert_eq!(runs, 4);
}

#[tokio::test]
async fn drain_evicts_every_task_and_refuses_new_ones() {
    let mut n = Node::start().await;
    for id in ["d1", "d2"] {
        n.run(n.spec(id, &["sleep", "600"])).await;
        n.wait_running(id).await;
    }
    let evicted = n
        .client
        .drain(pb::DrainRequest { grace_ms: 500 })
        .await
        .unwrap()
        .into_inner()
        .evicted;
    assert_eq!(evicted, ["d1", "d2"]);
    for id in ["d1", "d2"] {
        let t = n.wait_finished(id).await;
        assert_eq!(state(&t), pb::TaskState::Evicted);
        assert_eq!(reason(&t), pb::TaskReason::NodeDrain);
    }
    let refused = n
        .client
        .run_task(pb::RunTaskRequest {
            spec: Some(n.spec("late", &["true"])),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    let status = n.status().await;
    assert!(status.cordoned && status.draining);
    n.client.uncordon(pb::UncordonRequest {}).await.unwrap();
    let (t, _) = n.run_to_end(n.spec("after", &["true"])).await;
    assert_eq!(reason(&t), pb::TaskReason::Exited);
}

#[tokio::test]
async fn watch_sees_every_transition() {
    let mut n = Node::start().await;
    let mut watch = n
        .client
        .watch_tasks(pb::WatchTasksRequest {
            initial_state: false,
        })
        .await
        .unwrap()
        .into_inner();
    n.run(n.spec("watched", &["true"])).await;
    let mut seen = Vec::new();
    let mut last_gen = 0;
    while let Ok(Some(e)) = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .map(|r| r.unwrap())
    {
        assert!(e.generation > last_gen);
        last_gen = e.generation;
        let t = e.task.unwrap();
        seen.push(state(&t));
        if t.state == pb::TaskState::Dead as i32 {
            break;
        }
    }
    use pb::TaskState::*;
    assert_eq!(seen, [Pending, Starting, Running, Dead]);
}

#[tokio::test]
async fn run_task_is_idempotent_by_id() {
    let mut n = Node::start().await;
    let spec = n.spec("same", &["sleep", "600"]);
    let first = n
        .client
        .run_task(pb::RunTaskRequest {
            spec: Some(spec.clone()),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(first.created);
    let again = n
        .client
        .run_task(pb::RunTaskRequest {
            spec: Some(spec.clone()),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!again.created);
    let mut other = spec;
    other.argv = vec!["sleep".into(), "1".into()];
    let e = n
        .client
        .run_task(pb::RunTaskRequest { spec: Some(other) })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::AlreadyExists);
    assert_eq!(
        n.client
            .list_tasks(pb::ListTasksRequest::default())
            .await
            .unwrap()
            .into_inner()
            .tasks
            .len(),
        1
    );
}

#[tokio::test]
async fn a_setup_failure_is_failed_to_start_with_the_step_and_errno() {
    let mut n = Node::start().await;
    let mut spec = n.spec("nocwd", &["true"]);
    spec.cwd = "/does/not/exist".into();
    let (t, _) = n.run_to_end(spec).await;
    assert_eq!(reason(&t), pb::TaskReason::FailedToStart);
    assert!(
        t.message.contains("chdir") && t.message.contains("ENOENT"),
        "{}",
        t.message
    );
    // The node goes on.
    let (t, _) = n.run_to_end(n.spec("fine", &["true"])).await;
    assert_eq!(reason(&t), pb::TaskReason::Exited);
}

#[tokio::test]
async fn a_higher_priority_task_preempts_when_the_node_is_full() {
    let mut n = Node::start().await;
    let status = n.status().await;
    let alloc = status.allocatable.unwrap();
    let mut low = n.spec("low", &["sleep", "600"]);
    low.priority = 10;
    low.resources.as_mut().unwrap().cpu_millis = alloc.cpu_millis;
    n.run(low).await;
    n.wait_running("low").await;
    let mut blocked = n.spec("same-prio", &["true"]);
    blocked.priority = 10;
    let e = n
        .client
        .run_task(pb::RunTaskRequest {
            spec: Some(blocked),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
    let mut high = n.spec("high", &["sleep", "600"]);
    high.priority = 100;
    n.run(high).await;
    let t = n.wait_finished("low").await;
    assert_eq!(state(&t), pb::TaskState::Evicted);
    assert_eq!(reason(&t), pb::TaskReason::Preempted);
    n.wait_running("high").await;
}

#[tokio::test]
async fn status_reports_the_node_its_tasks_and_a_growing_generation() {
    let mut n = Node::start().await;
    let s1 = n.status().await;
    assert!(!s1.boot_id.is_empty() && !s1.kernel_release.is_empty());
    assert_eq!(s1.mode, "daemon");
    assert!(s1.capacity.unwrap().memory_bytes > 0);
    assert!(s1.usage.unwrap().memory_available_bytes > 0);
    assert!(
        s1.conditions
            .iter()
            .any(|c| c.r#type == "Ready" && c.status)
    );
    n.run(n.spec("busy", &["sh", "-c", "while :; do :; done"]))
        .await;
    n.wait_running("busy").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let s2 = n
        .client
        .get_status(pb::GetStatusRequest {
            if_generation_differs_from: s1.generation,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(s2.generation > s1.generation);
    let busy = s2.tasks.iter().find(|t| t.id == "busy").unwrap();
    let usage = busy.usage.unwrap();
    assert!(usage.cpu_usec > 100_000, "{usage:?}");
    assert!(usage.memory_bytes > 0);
    let same = n
        .client
        .get_status(pb::GetStatusRequest {
            if_generation_differs_from: s2.generation,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(same.unchanged && same.tasks.is_empty());
    // sysctls: write back the current value of one, and a bad one; both reported.
    let current = std::fs::read_to_string("/proc/sys/vm/swappiness").unwrap();
    let r = n
        .client
        .apply_sysctls(pb::ApplySysctlsRequest {
            sysctls: [
                ("vm.swappiness".to_string(), current.trim().to_string()),
                ("vm.no_such_knob".to_string(), "1".to_string()),
            ]
            .into(),
        })
        .await
        .unwrap()
        .into_inner();
    let ok = r.results.iter().find(|r| r.key == "vm.swappiness").unwrap();
    assert!(ok.error.is_empty() && ok.actual == current.trim(), "{ok:?}");
    let bad = r
        .results
        .iter()
        .find(|r| r.key == "vm.no_such_knob")
        .unwrap();
    assert!(bad.error.contains("no such sysctl"), "{bad:?}");
    let s3 = n.status().await;
    assert_eq!(s3.sysctls.len(), 2);
    assert!(s3.generation > s2.generation);
}

#[tokio::test]
async fn an_oci_config_runs_as_a_task() {
    let mut n = Node::start().await;
    let config = serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": ["sh", "-c", "echo from-oci; hostname"],
            "env": ["PATH=/bin"],
            "cwd": "/"
        },
        "root": {"path": n.rootfs, "readonly": true},
        "hostname": "oci-box",
        "linux": {
            "resources": {"memory": {"limit": 33554432}, "cpu": {"quota": 20000, "period": 100000}},
            "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "mount"}]
        }
    });
    let spec = pb::TaskSpec {
        id: "oci".into(),
        oci_config_json: config.to_string(),
        ..Default::default()
    };
    let (t, out) = n.run_to_end(spec).await;
    assert_eq!(t.exit_code, 0, "{out}");
    assert_eq!(out, "from-oci\noci-box\n");
    assert_eq!(t.resources.unwrap().cpu_millis, 200);
}

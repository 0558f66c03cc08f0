//! The operators' CLI against a real master and node: every command's happy path, the
//! errors people hit, and the exit codes scripts rely on (0 done, 1 refused or failed,
//! 2 bad command line, 3 master unreachable, 4 no such thing).

mod common;

use std::process::Command;

use common::Cell;

fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cellmaster"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn command_line_mistakes_and_an_absent_master_have_their_own_exit_codes() {
    for bad in [
        &["frobnicate"][..],
        &["kill"],
        &["nodes", "--bogus"],
        &["drain", "n1", "--timeout-s", "soon"],
        &["describe", "pod", "x"],
        &["logs", "t", "--tail", "-1"],
    ] {
        let (code, err) = run(bad);
        assert_eq!(code, 2, "{bad:?}: {err}");
        assert!(err.contains("usage:"), "{bad:?}: {err}");
    }
    // A bad config file stops serve before it listens, naming line and field.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("master.toml");
    std::fs::write(&config, "[[node]]\nid = \"n1\"\naddress = \"nowhere\"\n").unwrap();
    let state = dir.path().join("state.db");
    let (code, err) = run(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--state",
        state.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("line 3") && err.contains("node.address"),
        "{err}"
    );

    let port = common::free_port();
    let (code, err) = run(&[
        "nodes",
        "--insecure",
        "--master",
        &format!("127.0.0.1:{port}"),
    ]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("cannot reach the master"), "{err}");
}

#[test]
fn every_command_against_a_cell() {
    let mut cell = Cell::new(300);
    cell.add_node("alpha");
    cell.wait_ready(&["alpha"]);
    let rootfs = cell.rootfs().display().to_string();
    let job = format!(
        "name = \"hello\"\nreplicas = 2\nargv = [\"sh\", \"-c\", \"echo hello from $(hostname); sleep 600\"]\n\
         rootfs = {rootfs:?}\nkill_grace_ms = 200\n[resources]\nmemory = \"8MiB\"\ncpu_millis = 50\n"
    );
    let out = cell.submit_text("hello", &job);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("hello-0 hello-1"), "{out:?}");
    // The same name again is refused and changes nothing.
    let out = cell.submit_text("hello", &job);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("exists"), "{out:?}");
    // A bad file names line and field.
    let out = cell.submit_text(
        "bad",
        &job.replace("hello", "bad")
            .replace("replicas = 2", "replicas = 0"),
    );
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("line 2") && out.stderr.contains("replicas"),
        "{out:?}"
    );
    cell.wait("hello running", 30, || {
        let t = cell.tasks();
        (t.len() == 2 && t.values().all(|(s, _)| s == "running")).then_some(())
    });

    // Tables for people.
    let jobs = cell.cli(&["jobs"]);
    assert!(jobs.stdout.starts_with("JOB"), "{jobs:?}");
    assert!(
        jobs.stdout
            .lines()
            .any(|l| l.starts_with("hello") && l.contains("2/2")),
        "{jobs:?}"
    );
    let node = cell.cli(&["describe", "node", "alpha"]);
    assert_eq!(node.code, 0, "{node:?}");
    assert!(
        node.stdout.contains("READY") && node.stdout.contains("hello-0"),
        "{node:?}"
    );
    let job = cell.cli(&["describe", "job", "hello"]);
    assert!(
        job.stdout.contains("Budget:") && job.stdout.contains("2 running of 2"),
        "{job:?}"
    );
    let task = cell.cli(&["describe", "task", "hello-1"]);
    assert!(task.stdout.contains("On node:     RUNNING"), "{task:?}");

    // Logs come from the node through the master.
    let logs = cell.wait("hello's output", 20, || {
        let out = cell.cli(&["logs", "hello-0"]);
        (out.code == 0 && out.stdout.contains("hello from")).then_some(out.stdout)
    });
    assert!(logs.contains("hello from"), "{logs}");

    // Things that do not exist: exit code 4.
    for args in [
        &["describe", "task", "nope-0"][..],
        &["describe", "node", "nope"],
        &["describe", "job", "nope"],
        &["kill", "nope"],
        &["cordon", "nope"],
        &["drain", "nope"],
        &["logs", "nope-0"],
    ] {
        let out = cell.cli(args);
        assert_eq!(out.code, 4, "{args:?}: {out:?}");
    }

    // Killing one task: it stops on the node and is not replaced.
    let out = cell.cli(&["kill", "hello-0"]);
    assert_eq!(out.code, 0, "{out:?}");
    cell.wait("hello-0 stopped on alpha", 20, || {
        (!cell
            .running_on("alpha")
            .iter()
            .any(|t| t.starts_with("hello-0-")))
        .then_some(())
    });
    let tasks = cell.tasks();
    assert_eq!(tasks["hello-0"].0, "killed", "{tasks:#?}");
    assert_eq!(tasks["hello-1"].0, "running", "{tasks:#?}");
    assert_eq!(cell.cli(&["kill", "hello-0"]).code, 1);

    // Killing the job: all gone, and the name is free again.
    let out = cell.cli(&["kill", "hello"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("job hello killed"), "{out:?}");
    assert!(cell.tasks().is_empty());
    cell.wait("hello-1 stopped on alpha", 20, || {
        cell.running_on("alpha").is_empty().then_some(())
    });
    assert_eq!(cell.json(&["jobs"]), serde_json::json!([]));

    // Cordon: a new job waits and says why; uncordon lets it run.
    assert_eq!(cell.cli(&["cordon", "alpha"]).code, 0);
    let out = cell.submit("later", "[resources]\nmemory = \"8MiB\"\ncpu_millis = 50\n");
    assert_eq!(out.code, 0, "{out:?}");
    cell.wait("later pending because alpha is cordoned", 20, || {
        let t = cell.json(&["tasks"]);
        let r = t[0]["reason"].as_str().unwrap_or_default().to_string();
        r.contains("cordoned").then_some(())
    });
    assert_eq!(cell.cli(&["uncordon", "alpha"]).code, 0);
    cell.wait("later running", 20, || {
        (cell.tasks()["later-0"].0 == "running").then_some(())
    });
}

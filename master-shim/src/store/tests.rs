use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::*;
use crate::jobfile::parse_job;

fn job(name: &str, replicas: u32) -> JobRow {
    let text = format!(
        "name = {name:?}\nreplicas = {replicas}\npriority = 100\nargv = [\"/bin/true\"]\n\
         rootfs = \"/rootfs/busybox\"\n[resources]\nmemory = \"64MiB\"\ncpu_millis = 250\n"
    );
    JobRow {
        name: name.to_string(),
        spec: parse_job(&text).unwrap(),
        created_ms: 1_700_000_000_000,
    }
}

fn replicas(j: &JobRow) -> Vec<TaskRow> {
    (0..j.spec.replicas)
        .map(|i| TaskRow::pending_replica(&j.spec, i))
        .collect()
}

fn node(id: &str) -> NodeRow {
    NodeRow {
        id: id.to_string(),
        address: format!("{id}.cell:7070"),
        labels: [("zone".to_string(), "a".to_string())].into(),
        state: NodeState::Ready,
        cordoned: false,
        boot_id: "b-1".to_string(),
        image_version: "0.1.0".to_string(),
        allocatable: Resources::new(8 << 30, 4000),
        last_seen_ms: 1_700_000_000_500,
        machine_id: format!("machine-{id}"),
        macs: vec!["52:54:00:00:00:01".into()],
        boot_version: "v1".into(),
    }
}

fn open(dir: &tempfile::TempDir) -> SqliteStore {
    SqliteStore::open(&dir.path().join("cell.db")).unwrap()
}

#[test]
fn reopening_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let web = job("web", 3);
    let rev = {
        let s = open(&dir);
        assert_eq!(s.revision().unwrap(), 0);
        s.put_node(&node("n1")).unwrap();
        s.submit_job(&web, &replicas(&web)).unwrap();
        s.place_task("web-1", "n1", &[]).unwrap().0
    };
    let s = open(&dir);
    assert_eq!(s.revision().unwrap(), rev);
    assert_eq!(s.list_nodes().unwrap(), [node("n1")]);
    assert_eq!(s.get_job("web").unwrap(), Some(web.clone()));
    let tasks = s.list_tasks().unwrap();
    assert_eq!(tasks.len(), 3);
    let t1 = s.get_task("web-1").unwrap().unwrap();
    assert_eq!(
        (t1.state, t1.node.as_deref()),
        (TaskState::Assigned, Some("n1"))
    );
    assert_eq!(t1.resources, web.spec.resources);
    assert_eq!(s.tasks_on_node("n1").unwrap(), [t1]);
    // Writes after the reopen go on counting.
    assert!(s.put_node(&node("n2")).unwrap() > rev);
}

#[test]
fn every_write_moves_the_revision() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir);
    let a = s.put_node(&node("n1")).unwrap();
    let b = s.put_node(&node("n1")).unwrap();
    let web = job("web", 1);
    let c = s.submit_job(&web, &replicas(&web)).unwrap();
    assert!(0 < a && a < b && b < c, "{a} {b} {c}");
    assert_eq!(s.revision().unwrap(), c);
}

#[test]
fn a_submission_is_all_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir);
    let web = job("web", 3);
    let mut tasks = replicas(&web);
    // The last insert fails (a duplicate id) after the job and two tasks went in.
    tasks[2].id = tasks[0].id.clone();
    let before = s.revision().unwrap();
    let e = s.submit_job(&web, &tasks).unwrap_err();
    assert!(
        matches!(e, StoreError::AlreadyExists { kind: "task", .. }),
        "{e}"
    );
    assert_eq!(s.get_job("web").unwrap(), None);
    assert_eq!(s.list_tasks().unwrap(), []);
    assert_eq!(s.revision().unwrap(), before);
    // A task naming another job is refused the same way.
    let mut tasks = replicas(&web);
    tasks[1].job = "db".to_string();
    assert!(s.submit_job(&web, &tasks).is_err());
    assert_eq!(s.list_jobs().unwrap(), []);
    // And the good one goes in whole, once.
    s.submit_job(&web, &replicas(&web)).unwrap();
    assert_eq!(s.tasks_of_job("web").unwrap().len(), 3);
    let e = s.submit_job(&web, &replicas(&web)).unwrap_err();
    assert_eq!(e.to_string(), "job web already exists");
    assert_eq!(s.list_tasks().unwrap().len(), 3);
}

#[test]
fn a_node_going_down_loses_its_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir);
    s.put_node(&node("n1")).unwrap();
    s.put_node(&node("n2")).unwrap();
    let web = job("web", 3);
    s.submit_job(&web, &replicas(&web)).unwrap();
    s.place_task("web-0", "n1", &[]).unwrap();
    s.place_task("web-1", "n1", &[]).unwrap();
    s.place_task("web-2", "n2", &[]).unwrap();
    s.set_task_state("web-1", TaskState::Running, "").unwrap();
    let (_, lost) = s.mark_node_down("n1", "node n1 down").unwrap();
    let ids: Vec<_> = lost.iter().map(|t| t.id.as_str()).collect();
    assert_eq!(ids, ["web-0", "web-1"]);
    for t in &lost {
        assert_eq!((t.state, t.node.as_deref()), (TaskState::Lost, None));
        assert_eq!(t.reason, "node n1 down");
        assert!(t.state.wants_node());
    }
    assert_eq!(s.get_node("n1").unwrap().unwrap().state, NodeState::Down);
    assert_eq!(s.tasks_on_node("n2").unwrap().len(), 1);
    assert!(matches!(
        s.mark_node_down("n9", "x").unwrap_err(),
        StoreError::NotFound { kind: "node", .. }
    ));
}

#[test]
fn placing_with_victims_is_one_change() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir);
    s.put_node(&node("n1")).unwrap();
    let (batch, web) = (job("batch", 2), job("web", 1));
    s.submit_job(&batch, &replicas(&batch)).unwrap();
    s.submit_job(&web, &replicas(&web)).unwrap();
    s.place_task("batch-0", "n1", &[]).unwrap();
    // A victim not on that node refuses the whole placement.
    let e = s
        .place_task("web-0", "n1", &["batch-0".into(), "batch-1".into()])
        .unwrap_err();
    assert!(matches!(e, StoreError::NotFound { .. }), "{e}");
    assert_eq!(
        s.get_task("batch-0").unwrap().unwrap().state,
        TaskState::Assigned
    );
    assert_eq!(
        s.get_task("web-0").unwrap().unwrap().state,
        TaskState::Pending
    );

    s.place_task("web-0", "n1", &["batch-0".into()]).unwrap();
    let victim = s.get_task("batch-0").unwrap().unwrap();
    assert_eq!((victim.state, victim.node), (TaskState::Preempted, None));
    assert_eq!(victim.reason, "preempted by web-0");
    assert_eq!(
        s.get_task("web-0").unwrap().unwrap().node.as_deref(),
        Some("n1")
    );
    assert!(s.place_task("web-0", "n9", &[]).is_err());
}

#[test]
fn deleting() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir);
    s.put_node(&node("n1")).unwrap();
    let web = job("web", 2);
    s.submit_job(&web, &replicas(&web)).unwrap();
    s.place_task("web-0", "n1", &[]).unwrap();
    // Not while it holds a task.
    assert!(s.delete_node("n1").is_err());
    s.set_task_state("web-0", TaskState::Killed, "killed by admin")
        .unwrap();
    // A finished task keeps its node (for its logs) but holds nothing there.
    assert_eq!(
        s.get_task("web-0").unwrap().unwrap().node.as_deref(),
        Some("n1")
    );
    s.delete_node("n1").unwrap();
    s.delete_task("web-1").unwrap();
    assert!(s.delete_task("web-1").is_err());
    s.delete_job("web").unwrap();
    assert_eq!(s.list_tasks().unwrap(), []);
    assert!(matches!(
        s.delete_job("web").unwrap_err(),
        StoreError::NotFound { kind: "job", .. }
    ));
    // A task needs its job.
    let orphan = TaskRow::pending_replica(&web.spec, 0);
    assert!(matches!(
        s.put_task(&orphan).unwrap_err(),
        StoreError::NotFound { kind: "job", .. }
    ));
}

#[test]
fn a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cell.db");
    drop(SqliteStore::open(&path).unwrap());
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.pragma_update(None, "user_version", 99).unwrap();
    drop(conn);
    let e = SqliteStore::open(&path).err().unwrap();
    assert!(
        matches!(
            e,
            StoreError::SchemaTooNew {
                found: 99,
                supported: 4
            }
        ),
        "{e}"
    );
}

#[test]
fn the_file_is_wal_and_plain_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir);
    s.put_node(&node("n1")).unwrap();
    // Any SQLite client reads it: what the sqlite3 shell would see.
    let conn = rusqlite::Connection::open(dir.path().join("cell.db")).unwrap();
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    let state: String = conn
        .query_row("SELECT state FROM nodes WHERE id = 'n1'", [], |r| r.get(0))
        .unwrap();
    assert_eq!(state, "ready");
}

#[test]
fn readers_see_whole_submissions_while_a_writer_writes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cell.db");
    let writer = SqliteStore::open(&path).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let (path, done) = (path.clone(), done.clone());
            std::thread::spawn(move || {
                let s = SqliteStore::open(&path).unwrap();
                let mut looks = 0;
                while !done.load(Ordering::Relaxed) || looks == 0 {
                    let tasks = s.list_tasks().unwrap();
                    let jobs = s.list_jobs().unwrap();
                    // Each job has 5 replicas: never a part of one. (Jobs are read after
                    // tasks, so there may be more of them, never fewer.)
                    assert_eq!(tasks.len() % 5, 0, "a partial submission was visible");
                    assert!(jobs.len() * 5 >= tasks.len());
                    looks += 1;
                }
                looks
            })
        })
        .collect();
    for i in 0..40 {
        let j = job(&format!("job-{i}"), 5);
        writer.submit_job(&j, &replicas(&j)).unwrap();
    }
    done.store(true, Ordering::Relaxed);
    for r in readers {
        assert!(r.join().unwrap() > 0);
    }
    assert_eq!(writer.list_tasks().unwrap().len(), 200);
}

#[test]
fn one_store_shared_between_threads() {
    let dir = tempfile::tempdir().unwrap();
    let s: Arc<dyn Store> = Arc::new(open(&dir));
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let s = s.clone();
            std::thread::spawn(move || {
                let j = job(&format!("j{i}"), 2);
                s.submit_job(&j, &replicas(&j)).unwrap()
            })
        })
        .collect();
    let mut revs: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    revs.sort_unstable();
    revs.dedup();
    assert_eq!(revs.len(), 4, "each write its own revision");
    assert_eq!(s.list_tasks().unwrap().len(), 8);
}

#[test]
fn every_placement_is_a_new_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir);
    s.put_node(&node("n1")).unwrap();
    let web = job("web", 1);
    s.submit_job(&web, &replicas(&web)).unwrap();
    assert_eq!(s.get_task("web-0").unwrap().unwrap().attempt, 0);
    let (_, placed) = s.place_task("web-0", "n1", &[]).unwrap();
    assert_eq!(
        (placed.attempt, placed.node_task_id()),
        (1, "web-0-1".to_string())
    );
    s.set_task_state("web-0", TaskState::Lost, "n1 down")
        .unwrap();
    let (_, again) = s.place_task("web-0", "n1", &[]).unwrap();
    assert_eq!(again.node_task_id(), "web-0-2");
    assert_eq!(s.get_task("web-0").unwrap().unwrap(), again);
}

#[test]
fn updating_a_node_changes_only_what_the_update_touches() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir);
    s.put_node(&node("n1")).unwrap();
    let (_, n) = s.update_node("n1", &mut |n| n.cordoned = true).unwrap();
    assert_eq!(
        n,
        NodeRow {
            cordoned: true,
            ..node("n1")
        }
    );
    assert_eq!(s.get_node("n1").unwrap(), Some(n));
    assert!(matches!(
        s.update_node("n9", &mut |_| {}).unwrap_err(),
        StoreError::NotFound { kind: "node", .. }
    ));
    assert!(s.update_node("n1", &mut |n| n.id = "other".into()).is_err());
    assert!(s.get_node("other").unwrap().is_none());
}

#[test]
fn a_version_1_file_is_migrated_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cell.db");
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch(super::sqlite::SCHEMA_V1).unwrap();
        c.pragma_update(None, "user_version", 1).unwrap();
        c.execute(
            "INSERT INTO nodes VALUES ('n1', 'a:1', '{}', 'ready', 0, 'b', 'v', 1, 1, 1, 0, 1)",
            [],
        )
        .unwrap();
    }
    let s = SqliteStore::open(&path).unwrap();
    let n = s.get_node("n1").unwrap().unwrap();
    assert_eq!((n.address.as_str(), n.machine_id.as_str()), ("a:1", ""));
    drop(s);
    // Opening again finds nothing to do.
    SqliteStore::open(&path).unwrap();
}

#[test]
fn join_tokens_count_uses_expire_and_bind() {
    let dir = tempfile::tempdir().unwrap();
    let s = SqliteStore::open(&dir.path().join("cell.db")).unwrap();
    let token = |id: &str, expires_at, uses_left, node: &str, pxe: Option<&str>| JoinToken {
        id: id.into(),
        secret_sha256: format!("hash-{id}"),
        expires_at,
        uses_left,
        node: node.into(),
        pxe_text: pxe.map(str::to_string),
    };
    s.put_token(&token("a", 1000, 2, "", Some("a.secret")))
        .unwrap();
    s.put_token(&token("b", 1000, 1, "n1", None)).unwrap();
    s.put_token(&token("c", 10, 5, "", None)).unwrap();
    let take = |id: &str, hash: &str, node: &str| s.use_token(id, hash, node, 100).unwrap();
    assert_eq!(take("a", "hash-a", "n1"), Ok(1));
    assert_eq!(take("a", "hash-a", "n2"), Ok(0));
    assert_eq!(take("a", "hash-a", "n3"), Err(TokenRefusal::UsedUp));
    assert_eq!(take("a", "wrong", "n3"), Err(TokenRefusal::Unknown));
    assert_eq!(take("zz", "hash-a", "n3"), Err(TokenRefusal::Unknown));
    assert_eq!(
        take("b", "hash-b", "n2"),
        Err(TokenRefusal::OtherNode("n1".into()))
    );
    assert_eq!(take("b", "hash-b", "n1"), Ok(0));
    assert_eq!(take("c", "hash-c", "n1"), Err(TokenRefusal::Expired(10)));
    // The used-up PXE token is no longer handed out.
    assert_eq!(s.pxe_token(100).unwrap(), None);
    s.put_token(&token("d", 1000, 1, "", Some("d.secret")))
        .unwrap();
    assert_eq!(s.pxe_token(100).unwrap().as_deref(), Some("d.secret"));
    assert_eq!(s.pxe_token(1000).unwrap(), None);
}

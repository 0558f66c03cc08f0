//! [`Store`] on one SQLite file. WAL so readers never wait for the writer, and
//! `synchronous=FULL` so a write that returned survives a power cut, not just a crash of
//! the master. One connection per `SqliteStore`, behind a mutex; open several on the same
//! file for concurrent readers.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, Row, Transaction, TransactionBehavior, params};

use super::{
    JobRow, JoinToken, NodeRow, NodeState, Revision, Store, StoreError, TaskRow, TaskState,
    TokenRefusal,
};
use crate::jobfile::Resources;
use crate::rollout::Rollout;

mod tokens;

/// `PRAGMA user_version` of the schema below. A new version adds a step to `migrate`.
const SCHEMA_VERSION: i64 = 4;

pub(super) const SCHEMA_V1: &str = "
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT INTO meta (key, value) VALUES ('revision', 0);
CREATE TABLE nodes (
    id TEXT PRIMARY KEY,
    address TEXT NOT NULL,
    labels TEXT NOT NULL,          -- JSON object
    state TEXT NOT NULL,           -- unknown | ready | down
    cordoned INTEGER NOT NULL,
    boot_id TEXT NOT NULL,
    image_version TEXT NOT NULL,
    memory_bytes INTEGER NOT NULL, -- allocatable
    cpu_millis INTEGER NOT NULL,
    pids_max INTEGER NOT NULL,
    last_seen_ms INTEGER NOT NULL,
    revision INTEGER NOT NULL      -- of the last change to the row
);
CREATE TABLE jobs (
    name TEXT PRIMARY KEY,
    spec TEXT NOT NULL,            -- JobSpec as JSON
    created_ms INTEGER NOT NULL,
    revision INTEGER NOT NULL
);
CREATE TABLE tasks (
    id TEXT PRIMARY KEY,
    job TEXT NOT NULL REFERENCES jobs (name) ON DELETE CASCADE,
    replica INTEGER NOT NULL,
    node TEXT,                     -- NULL while it wants a node
    state TEXT NOT NULL,
    reason TEXT NOT NULL,
    priority INTEGER NOT NULL,
    memory_bytes INTEGER NOT NULL,
    cpu_millis INTEGER NOT NULL,
    pids_max INTEGER NOT NULL,
    revision INTEGER NOT NULL
);
CREATE INDEX tasks_by_job ON tasks (job);
CREATE INDEX tasks_by_node ON tasks (node);
";

/// Version 2: the machine that owns a node id (impostors are refused across restarts) and
/// each task's attempt (every placement is a new incarnation on its node).
const SCHEMA_V2: &str = "
ALTER TABLE nodes ADD COLUMN machine_id TEXT NOT NULL DEFAULT '';
ALTER TABLE tasks ADD COLUMN attempt INTEGER NOT NULL DEFAULT 0;
";

/// Version 3: a node's network cards (PXE recognises machines by MAC) and the image it
/// boots; rollouts of images over the fleet.
const SCHEMA_V3: &str = "
ALTER TABLE nodes ADD COLUMN macs TEXT NOT NULL DEFAULT '[]';
ALTER TABLE nodes ADD COLUMN boot_version TEXT NOT NULL DEFAULT '';
CREATE TABLE rollouts (
    id INTEGER PRIMARY KEY,
    state TEXT NOT NULL,
    body TEXT NOT NULL,            -- Rollout as JSON
    revision INTEGER NOT NULL
);
";

/// Version 4: join tokens (only the secret's hash, except for the one the PXE script
/// hands out).
const SCHEMA_V4: &str = "
CREATE TABLE join_tokens (
    id TEXT PRIMARY KEY,
    secret_sha256 TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    uses_left INTEGER NOT NULL,
    node TEXT NOT NULL DEFAULT '',
    pxe_text TEXT
);
";

const TASK_COLUMNS: &str = "id, job, replica, node, state, reason, priority, memory_bytes, \
                            cpu_millis, pids_max, attempt";
const NODE_COLUMNS: &str = "id, address, labels, state, cordoned, boot_id, image_version, \
                            memory_bytes, cpu_millis, pids_max, last_seen_ms, machine_id, \
                            macs, boot_version";

pub struct SqliteStore {
    conn: Mutex<Connection>,
}

fn sql(op: impl Into<String>) -> impl FnOnce(rusqlite::Error) -> StoreError {
    let op = op.into();
    move |source| StoreError::Sqlite { op, source }
}

// SQLite integers are i64. No real size or time passes i64::MAX; clamping keeps the
// conversion total without a failure path nobody can reach.
fn to_sql(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn from_sql(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl SqliteStore {
    /// Opens the store at `path`, creating the file and schema if needed.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let at = path.display();
        let mut conn = Connection::open(path).map_err(sql(format!("open {at}")))?;
        // journal_mode answers with a row, so it is a query, not an execute.
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(sql(format!("{at}: WAL mode")))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Corrupt {
                what: "journal_mode (WAL refused)",
                value: mode,
            });
        }
        conn.execute_batch("PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;")
            .map_err(sql(format!("{at}: pragmas")))?;
        // Another master process or a reader holding the write lock briefly: wait, do
        // not fail.
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(sql(format!("{at}: busy timeout")))?;
        migrate(&mut conn).map_err(|e| match e {
            StoreError::Sqlite { op, source } => StoreError::Sqlite {
                op: format!("{at}: {op}"),
                source,
            },
            other => other,
        })?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock left no open transaction behind (it rolls back
        // on drop), so the connection is still good.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` in one immediate transaction after moving the revision forward.
    fn write<T>(
        &self,
        op: &str,
        f: impl FnOnce(&Transaction, Revision) -> Result<T, StoreError>,
    ) -> Result<(Revision, T), StoreError> {
        let mut conn = self.lock();
        // IMMEDIATE takes the write lock now, so two writers never deadlock upgrading.
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql(format!("{op}: begin")))?;
        let rev: i64 = tx
            .query_row(
                "UPDATE meta SET value = value + 1 WHERE key = 'revision' RETURNING value",
                [],
                |r| r.get(0),
            )
            .map_err(sql(format!("{op}: revision")))?;
        let rev = from_sql(rev);
        let out = f(&tx, rev)?;
        tx.commit().map_err(sql(format!("{op}: commit")))?;
        Ok((rev, out))
    }

    fn query<T>(
        &self,
        op: &str,
        q: &str,
        args: impl rusqlite::Params,
        map: fn(&Row) -> rusqlite::Result<Result<T, StoreError>>,
    ) -> Result<Vec<T>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(q).map_err(sql(op))?;
        let rows = stmt.query_map(args, map).map_err(sql(op))?;
        let mut out = Vec::new();
        for row in rows {
            out.push(row.map_err(sql(op))??);
        }
        Ok(out)
    }
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(sql("read schema version"))?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            found: version,
            supported: SCHEMA_VERSION,
        });
    }
    // Each step and its version number in one transaction, so a crash leaves the file at
    // the last whole step, which the next open continues from.
    let steps: [(i64, &str); 4] = [
        (1, SCHEMA_V1),
        (2, SCHEMA_V2),
        (3, SCHEMA_V3),
        (4, SCHEMA_V4),
    ];
    for (to, script) in steps {
        if version >= to {
            continue;
        }
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql(format!("schema {to}: begin")))?;
        // Another process may have migrated while this one waited for the lock.
        let now: i64 = tx
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(sql("read schema version"))?;
        if now >= to {
            continue;
        }
        tx.execute_batch(script)
            .map_err(sql(format!("schema {to}")))?;
        tx.pragma_update(None, "user_version", to)
            .map_err(sql(format!("set schema version {to}")))?;
        tx.commit().map_err(sql(format!("schema {to}: commit")))?;
    }
    Ok(())
}

fn node_from_row(r: &Row) -> rusqlite::Result<Result<NodeRow, StoreError>> {
    let labels: String = r.get(2)?;
    let state: String = r.get(3)?;
    let Some(state) = NodeState::parse(&state) else {
        return Ok(Err(StoreError::Corrupt {
            what: "nodes.state",
            value: state,
        }));
    };
    let labels: BTreeMap<String, String> = match serde_json::from_str(&labels) {
        Ok(l) => l,
        Err(_) => {
            return Ok(Err(StoreError::Corrupt {
                what: "nodes.labels",
                value: labels,
            }));
        }
    };
    let macs: String = r.get(12)?;
    let Ok(macs) = serde_json::from_str::<Vec<String>>(&macs) else {
        return Ok(Err(StoreError::Corrupt {
            what: "nodes.macs",
            value: macs,
        }));
    };
    Ok(Ok(NodeRow {
        id: r.get(0)?,
        address: r.get(1)?,
        labels,
        state,
        cordoned: r.get(4)?,
        boot_id: r.get(5)?,
        image_version: r.get(6)?,
        allocatable: Resources {
            memory_bytes: from_sql(r.get(7)?),
            cpu_millis: from_sql(r.get(8)?),
            pids_max: from_sql(r.get(9)?),
        },
        last_seen_ms: from_sql(r.get(10)?),
        machine_id: r.get(11)?,
        macs,
        boot_version: r.get(13)?,
    }))
}

fn job_from_row(r: &Row) -> rusqlite::Result<Result<JobRow, StoreError>> {
    let name: String = r.get(0)?;
    let spec: String = r.get(1)?;
    let created_ms = from_sql(r.get(2)?);
    Ok(match serde_json::from_str(&spec) {
        Ok(spec) => Ok(JobRow {
            name,
            spec,
            created_ms,
        }),
        Err(source) => Err(StoreError::Json { job: name, source }),
    })
}

fn task_from_row(r: &Row) -> rusqlite::Result<Result<TaskRow, StoreError>> {
    let state: String = r.get(4)?;
    let Some(state) = TaskState::parse(&state) else {
        return Ok(Err(StoreError::Corrupt {
            what: "tasks.state",
            value: state,
        }));
    };
    Ok(Ok(TaskRow {
        id: r.get(0)?,
        job: r.get(1)?,
        replica: r.get(2)?,
        node: r.get(3)?,
        state,
        reason: r.get(5)?,
        priority: r.get(6)?,
        resources: Resources {
            memory_bytes: from_sql(r.get(7)?),
            cpu_millis: from_sql(r.get(8)?),
            pids_max: from_sql(r.get(9)?),
        },
        attempt: r.get(10)?,
    }))
}

/// Inserts (or with `replace`, replaces) a task row.
fn write_task(
    tx: &Transaction,
    t: &TaskRow,
    rev: Revision,
    replace: bool,
) -> Result<(), StoreError> {
    let verb = if replace {
        "INSERT OR REPLACE"
    } else {
        "INSERT"
    };
    let q = format!(
        "{verb} INTO tasks ({TASK_COLUMNS}, revision) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"
    );
    let r = &t.resources;
    tx.prepare_cached(&q)
        .and_then(|mut s| {
            s.execute(params![
                t.id,
                t.job,
                t.replica,
                t.node,
                t.state.as_str(),
                t.reason,
                t.priority,
                to_sql(r.memory_bytes),
                to_sql(r.cpu_millis),
                to_sql(r.pids_max),
                t.attempt,
                to_sql(rev),
            ])
        })
        .map_err(|e| match e {
            rusqlite::Error::SqliteFailure(f, _)
                if f.code == rusqlite::ErrorCode::ConstraintViolation && !replace =>
            {
                StoreError::AlreadyExists {
                    kind: "task",
                    id: t.id.clone(),
                }
            }
            other => StoreError::Sqlite {
                op: format!("write task {}", t.id),
                source: other,
            },
        })?;
    Ok(())
}

fn write_node(tx: &Transaction, n: &NodeRow, rev: Revision) -> Result<(), StoreError> {
    let labels = serde_json::to_string(&n.labels).map_err(|source| StoreError::Json {
        job: format!("(labels of node {})", n.id),
        source,
    })?;
    let q = format!(
        "INSERT OR REPLACE INTO nodes ({NODE_COLUMNS}, revision) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)"
    );
    let macs = serde_json::to_string(&n.macs).map_err(|source| StoreError::Json {
        job: format!("(macs of node {})", n.id),
        source,
    })?;
    let a = &n.allocatable;
    tx.prepare_cached(&q)
        .and_then(|mut s| {
            s.execute(params![
                n.id,
                n.address,
                labels,
                n.state.as_str(),
                n.cordoned,
                n.boot_id,
                n.image_version,
                to_sql(a.memory_bytes),
                to_sql(a.cpu_millis),
                to_sql(a.pids_max),
                to_sql(n.last_seen_ms),
                n.machine_id,
                macs,
                n.boot_version,
                to_sql(rev),
            ])
        })
        .map_err(sql(format!("put node {}", n.id)))?;
    Ok(())
}

fn require(changed: usize, kind: &'static str, id: &str) -> Result<(), StoreError> {
    if changed == 0 {
        return Err(StoreError::NotFound {
            kind,
            id: id.to_string(),
        });
    }
    Ok(())
}

fn exists(tx: &Transaction, table_query: &str, id: &str) -> Result<bool, StoreError> {
    tx.query_row(table_query, [id], |_| Ok(()))
        .optional()
        .map(|o| o.is_some())
        .map_err(sql(format!("look up {id}")))
}

impl Store for SqliteStore {
    fn revision(&self) -> Result<Revision, StoreError> {
        let rev: i64 = self
            .lock()
            .query_row("SELECT value FROM meta WHERE key = 'revision'", [], |r| {
                r.get(0)
            })
            .map_err(sql("read revision"))?;
        Ok(from_sql(rev))
    }

    fn put_node(&self, n: &NodeRow) -> Result<Revision, StoreError> {
        let (rev, ()) = self.write("put node", |tx, rev| write_node(tx, n, rev))?;
        Ok(rev)
    }

    fn update_node(
        &self,
        id: &str,
        change: &mut dyn FnMut(&mut NodeRow),
    ) -> Result<(Revision, NodeRow), StoreError> {
        self.write("update node", |tx, rev| {
            let q = format!("SELECT {NODE_COLUMNS} FROM nodes WHERE id = ?1");
            let mut node = tx
                .query_row(&q, [id], node_from_row)
                .optional()
                .map_err(sql(format!("read node {id}")))?
                .ok_or_else(|| StoreError::NotFound {
                    kind: "node",
                    id: id.to_string(),
                })??;
            change(&mut node);
            if node.id != id {
                return Err(StoreError::Corrupt {
                    what: "node id changed by an update",
                    value: node.id,
                });
            }
            write_node(tx, &node, rev)?;
            Ok(node)
        })
    }

    fn get_node(&self, id: &str) -> Result<Option<NodeRow>, StoreError> {
        let q = format!("SELECT {NODE_COLUMNS} FROM nodes WHERE id = ?1");
        Ok(self.query("get node", &q, [id], node_from_row)?.pop())
    }

    fn list_nodes(&self) -> Result<Vec<NodeRow>, StoreError> {
        let q = format!("SELECT {NODE_COLUMNS} FROM nodes ORDER BY id");
        self.query("list nodes", &q, [], node_from_row)
    }

    fn delete_node(&self, id: &str) -> Result<Revision, StoreError> {
        let (rev, ()) = self.write("delete node", |tx, _| {
            let busy = exists(
                tx,
                "SELECT 1 FROM tasks WHERE node = ?1 AND state IN ('assigned', 'running')",
                id,
            )?;
            if busy {
                return Err(StoreError::AlreadyExists {
                    kind: "task assigned to node",
                    id: id.to_string(),
                });
            }
            let n = tx
                .execute("DELETE FROM nodes WHERE id = ?1", [id])
                .map_err(sql(format!("delete node {id}")))?;
            require(n, "node", id)
        })?;
        Ok(rev)
    }

    fn mark_node_down(
        &self,
        id: &str,
        reason: &str,
    ) -> Result<(Revision, Vec<TaskRow>), StoreError> {
        self.write("mark node down", |tx, rev| {
            let n = tx
                .execute(
                    "UPDATE nodes SET state = 'down', revision = ?2 WHERE id = ?1",
                    params![id, to_sql(rev)],
                )
                .map_err(sql(format!("mark node {id} down")))?;
            require(n, "node", id)?;
            let q = format!(
                "UPDATE tasks SET state = 'lost', node = NULL, reason = ?2, revision = ?3 \
                 WHERE node = ?1 AND state IN ('assigned', 'running') \
                 RETURNING {TASK_COLUMNS}"
            );
            let mut stmt = tx.prepare(&q).map_err(sql("mark tasks lost"))?;
            let rows = stmt
                .query_map(params![id, reason, to_sql(rev)], task_from_row)
                .map_err(sql("mark tasks lost"))?;
            let mut lost = Vec::new();
            for row in rows {
                lost.push(row.map_err(sql("mark tasks lost"))??);
            }
            lost.sort_by(|a, b| a.id.cmp(&b.id));
            Ok(lost)
        })
    }

    fn submit_job(&self, job: &JobRow, tasks: &[TaskRow]) -> Result<Revision, StoreError> {
        let spec = serde_json::to_string(&job.spec).map_err(|source| StoreError::Json {
            job: job.name.clone(),
            source,
        })?;
        let (rev, ()) = self.write("submit job", |tx, rev| {
            if exists(tx, "SELECT 1 FROM jobs WHERE name = ?1", &job.name)? {
                return Err(StoreError::AlreadyExists {
                    kind: "job",
                    id: job.name.clone(),
                });
            }
            tx.execute(
                "INSERT INTO jobs (name, spec, created_ms, revision) VALUES (?1, ?2, ?3, ?4)",
                params![job.name, spec, to_sql(job.created_ms), to_sql(rev)],
            )
            .map_err(sql(format!("insert job {}", job.name)))?;
            for t in tasks {
                if t.job != job.name {
                    return Err(StoreError::NotFound {
                        kind: "job",
                        id: format!("{} (named by task {})", t.job, t.id),
                    });
                }
                write_task(tx, t, rev, false)?;
            }
            Ok(())
        })?;
        Ok(rev)
    }

    fn get_job(&self, name: &str) -> Result<Option<JobRow>, StoreError> {
        let q = "SELECT name, spec, created_ms FROM jobs WHERE name = ?1";
        Ok(self.query("get job", q, [name], job_from_row)?.pop())
    }

    fn list_jobs(&self) -> Result<Vec<JobRow>, StoreError> {
        let q = "SELECT name, spec, created_ms FROM jobs ORDER BY name";
        self.query("list jobs", q, [], job_from_row)
    }

    fn delete_job(&self, name: &str) -> Result<Revision, StoreError> {
        let (rev, ()) = self.write("delete job", |tx, _| {
            // The foreign key cascades to the job's tasks.
            let n = tx
                .execute("DELETE FROM jobs WHERE name = ?1", [name])
                .map_err(sql(format!("delete job {name}")))?;
            require(n, "job", name)
        })?;
        Ok(rev)
    }

    fn put_task(&self, task: &TaskRow) -> Result<Revision, StoreError> {
        let (rev, ()) = self.write("put task", |tx, rev| {
            if !exists(tx, "SELECT 1 FROM jobs WHERE name = ?1", &task.job)? {
                return Err(StoreError::NotFound {
                    kind: "job",
                    id: task.job.clone(),
                });
            }
            write_task(tx, task, rev, true)
        })?;
        Ok(rev)
    }

    fn get_task(&self, id: &str) -> Result<Option<TaskRow>, StoreError> {
        let q = format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?1");
        Ok(self.query("get task", &q, [id], task_from_row)?.pop())
    }

    fn list_tasks(&self) -> Result<Vec<TaskRow>, StoreError> {
        let q = format!("SELECT {TASK_COLUMNS} FROM tasks ORDER BY id");
        self.query("list tasks", &q, [], task_from_row)
    }

    fn tasks_of_job(&self, job: &str) -> Result<Vec<TaskRow>, StoreError> {
        let q = format!("SELECT {TASK_COLUMNS} FROM tasks WHERE job = ?1 ORDER BY replica");
        self.query("tasks of job", &q, [job], task_from_row)
    }

    fn tasks_on_node(&self, node: &str) -> Result<Vec<TaskRow>, StoreError> {
        let q = format!("SELECT {TASK_COLUMNS} FROM tasks WHERE node = ?1 ORDER BY id");
        self.query("tasks on node", &q, [node], task_from_row)
    }

    fn delete_task(&self, id: &str) -> Result<Revision, StoreError> {
        let (rev, ()) = self.write("delete task", |tx, _| {
            let n = tx
                .execute("DELETE FROM tasks WHERE id = ?1", [id])
                .map_err(sql(format!("delete task {id}")))?;
            require(n, "task", id)
        })?;
        Ok(rev)
    }

    fn set_task_state(
        &self,
        id: &str,
        state: TaskState,
        reason: &str,
    ) -> Result<Revision, StoreError> {
        let (rev, ()) = self.write("set task state", |tx, rev| {
            // A task to be placed again forgets its node, so reconciliation kills any copy
            // still running there; a finished one keeps it for its logs.
            let n = tx
                .execute(
                    "UPDATE tasks SET state = ?2, reason = ?3, revision = ?4, \
                     node = CASE WHEN ?5 THEN node ELSE NULL END WHERE id = ?1",
                    params![
                        id,
                        state.as_str(),
                        reason,
                        to_sql(rev),
                        state.is_on_node() || state.is_finished()
                    ],
                )
                .map_err(sql(format!("set state of task {id}")))?;
            require(n, "task", id)
        })?;
        Ok(rev)
    }

    fn place_task(
        &self,
        id: &str,
        node: &str,
        victims: &[String],
    ) -> Result<(Revision, TaskRow), StoreError> {
        self.write("place task", |tx, rev| {
            if !exists(tx, "SELECT 1 FROM nodes WHERE id = ?1", node)? {
                return Err(StoreError::NotFound {
                    kind: "node",
                    id: node.to_string(),
                });
            }
            for v in victims {
                let n = tx
                    .execute(
                        "UPDATE tasks SET state = 'preempted', node = NULL, reason = ?3, \
                         revision = ?4 WHERE id = ?1 AND node = ?2",
                        params![v, node, format!("preempted by {id}"), to_sql(rev)],
                    )
                    .map_err(sql(format!("preempt task {v}")))?;
                require(n, "task on that node", v)?;
            }
            let q = format!(
                "UPDATE tasks SET state = 'assigned', node = ?2, reason = '', \
                 attempt = attempt + 1, revision = ?3 WHERE id = ?1 RETURNING {TASK_COLUMNS}"
            );
            tx.query_row(&q, params![id, node, to_sql(rev)], task_from_row)
                .optional()
                .map_err(sql(format!("place task {id}")))?
                .ok_or_else(|| StoreError::NotFound {
                    kind: "task",
                    id: id.to_string(),
                })?
        })
    }

    fn put_rollout(&self, r: &Rollout) -> Result<Revision, StoreError> {
        let body = serde_json::to_string(r).map_err(|source| StoreError::Json {
            job: format!("(rollout {})", r.id),
            source,
        })?;
        let (rev, ()) = self.write("put rollout", |tx, rev| {
            tx.execute(
                "INSERT OR REPLACE INTO rollouts (id, state, body, revision) VALUES (?1, ?2, ?3, ?4)",
                params![to_sql(r.id), r.state.as_str(), body, to_sql(rev)],
            )
            .map_err(sql(format!("put rollout {}", r.id)))?;
            Ok(())
        })?;
        Ok(rev)
    }

    fn put_token(&self, t: &JoinToken) -> Result<(), StoreError> {
        tokens::put(&self.lock(), t)
    }

    fn use_token(
        &self,
        id: &str,
        secret_sha256: &str,
        node: &str,
        now: i64,
    ) -> Result<Result<u32, TokenRefusal>, StoreError> {
        tokens::take(&mut self.lock(), id, secret_sha256, node, now)
    }

    fn pxe_token(&self, now: i64) -> Result<Option<String>, StoreError> {
        tokens::for_pxe(&self.lock(), now)
    }

    fn last_rollout(&self) -> Result<Option<Rollout>, StoreError> {
        let rows = self.query(
            "last rollout",
            "SELECT body FROM rollouts ORDER BY id DESC LIMIT 1",
            [],
            |r| {
                let body: String = r.get(0)?;
                Ok(
                    serde_json::from_str::<Rollout>(&body).map_err(|source| StoreError::Json {
                        job: "(a rollout)".into(),
                        source,
                    }),
                )
            },
        )?;
        Ok(rows.into_iter().next())
    }
}

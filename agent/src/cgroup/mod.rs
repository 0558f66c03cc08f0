//! The only code that touches `/sys/fs/cgroup`: one cgroup per task under `celld/`, its
//! limits, its usage, and killing what is left in it.
//!
//! Inside the image the hierarchy is pure cgroup v2. On a development host with the v1
//! hybrid layout, cgroups-rs drives the v1 memory, cpu, cpuacct and pids hierarchies, so
//! limits hold in daemon mode too.

use std::fs;
use std::path::{Path, PathBuf};

use cgroups_rs::{Cgroup, CgroupPid, Hierarchy, MaxValue};

use crate::task::spec::Resources;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("creating cgroup {path}: {source}")]
    Create {
        path: String,
        source: cgroups_rs::error::Error,
    },
    #[error("setting limits on cgroup {path}: {source}")]
    Limits {
        path: String,
        source: cgroups_rs::error::Error,
    },
    #[error("moving pid {pid} into cgroup {path}: {source}")]
    AddPid {
        path: String,
        pid: u32,
        source: cgroups_rs::error::Error,
    },
}

/// Usage of one task, read back from its cgroup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub memory_bytes: u64,
    pub memory_peak_bytes: u64,
    pub cpu_usec: u64,
    pub oom_kills: u64,
    pub pids: u64,
}

const V1_CONTROLLERS: [&str; 4] = ["memory", "cpu", "cpuacct", "pids"];
const CFS_PERIOD_USEC: u64 = 100_000;

/// Where celld keeps its task cgroups.
#[derive(Debug, Clone)]
pub struct CgroupRoot {
    base: String,
    v2: bool,
    mount: PathBuf,
}

fn hierarchy() -> Box<dyn Hierarchy> {
    cgroups_rs::hierarchies::auto()
}

impl CgroupRoot {
    /// `base` is the parent cgroup of every task (e.g. `celld`).
    pub fn detect(base: &str) -> Self {
        let h = hierarchy();
        Self {
            base: base.trim_matches('/').to_string(),
            v2: h.v2(),
            mount: h.root(),
        }
    }

    pub fn version(&self) -> &'static str {
        if self.v2 { "v2" } else { "v1" }
    }

    fn rel_path(&self, task_id: &str) -> String {
        format!("{}/{}", self.base, task_id)
    }

    /// Creates (or reuses, after a crash) the cgroup of a task with its limits.
    pub fn create(&self, task_id: &str, res: &Resources) -> Result<TaskCgroup, CgroupError> {
        let path = self.rel_path(task_id);
        // On v2 every controller the root offers is enabled down the tree (cgroups-rs
        // 0.3's check of a named list trips over the newline in cgroup.controllers).
        let made = if self.v2 {
            Cgroup::new(hierarchy(), &path)
        } else {
            let controllers = V1_CONTROLLERS.iter().map(|s| s.to_string()).collect();
            Cgroup::new_with_specified_controllers(hierarchy(), &path, Some(controllers))
        };
        let cg = made.map_err(|source| CgroupError::Create {
            path: path.clone(),
            source,
        })?;
        let mut limits = cgroups_rs::Resources::default();
        limits.memory.memory_hard_limit = Some(res.memory_bytes as i64);
        limits.cpu.quota = Some((res.cpu_millis * CFS_PERIOD_USEC / 1000) as i64);
        limits.cpu.period = Some(CFS_PERIOD_USEC);
        // Relative weight when the CPU is contended: a full CPU gets the default 1024.
        limits.cpu.shares = Some((res.cpu_millis * 1024 / 1000).max(2));
        limits.pid.maximum_number_of_processes = Some(MaxValue::Value(res.pids_max as i64));
        let task = TaskCgroup {
            cg,
            v2: self.v2,
            path: path.clone(),
            dirs: self.dirs(&path),
        };
        task.cg
            .apply(&limits)
            .map_err(|source| CgroupError::Limits { path, source })?;
        // No swap: a task over its memory limit is OOM-killed, not slowed to a crawl.
        let _ = fs::write(task.dir("memory").join("memory.swap.max"), "0");
        Ok(task)
    }

    /// Removes the (empty) parent cgroup on shutdown; a busy one stays.
    pub fn remove_base(&self) {
        for (_, dir) in self.dirs(&self.base) {
            let _ = fs::remove_dir(dir);
        }
    }

    fn dirs(&self, rel: &str) -> Vec<(String, PathBuf)> {
        if self.v2 {
            vec![(String::new(), self.mount.join(rel))]
        } else {
            V1_CONTROLLERS
                .iter()
                .map(|c| (c.to_string(), self.mount.join(c).join(rel)))
                .collect()
        }
    }
}

/// The cgroup of one task.
pub struct TaskCgroup {
    cg: Cgroup,
    v2: bool,
    path: String,
    /// (controller, directory); one entry with an empty name on v2.
    dirs: Vec<(String, PathBuf)>,
}

fn read_u64(p: &Path) -> u64 {
    fs::read_to_string(p)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// The value of `key` in a flat-keyed file such as memory.events or cpu.stat.
fn read_key(p: &Path, key: &str) -> u64 {
    fs::read_to_string(p)
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                let (k, v) = l.split_once(' ')?;
                (k == key).then(|| v.trim().parse().ok())?
            })
        })
        .unwrap_or(0)
}

impl TaskCgroup {
    pub fn path(&self) -> &str {
        &self.path
    }

    fn dir(&self, controller: &str) -> PathBuf {
        self.dirs
            .iter()
            .find(|(c, _)| self.v2 || c == controller)
            .map(|(_, d)| d.clone())
            .unwrap_or_default()
    }

    pub fn add_pid(&self, pid: u32) -> Result<(), CgroupError> {
        self.cg
            .add_task_by_tgid(CgroupPid::from(pid as u64))
            .map_err(|source| CgroupError::AddPid {
                path: self.path.clone(),
                pid,
                source,
            })
    }

    /// OOM kills inside this cgroup since it was made.
    pub fn oom_kills(&self) -> u64 {
        let mem = self.dir("memory");
        if self.v2 {
            read_key(&mem.join("memory.events"), "oom_kill")
        } else {
            read_key(&mem.join("memory.oom_control"), "oom_kill")
        }
    }

    pub fn usage(&self) -> Usage {
        let mem = self.dir("memory");
        let pids = read_u64(&self.dir("pids").join("pids.current"));
        if self.v2 {
            Usage {
                memory_bytes: read_u64(&mem.join("memory.current")),
                memory_peak_bytes: read_u64(&mem.join("memory.peak")),
                cpu_usec: read_key(&mem.join("cpu.stat"), "usage_usec"),
                oom_kills: self.oom_kills(),
                pids,
            }
        } else {
            Usage {
                memory_bytes: read_u64(&mem.join("memory.usage_in_bytes")),
                memory_peak_bytes: read_u64(&mem.join("memory.max_usage_in_bytes")),
                cpu_usec: read_u64(&self.dir("cpuacct").join("cpuacct.usage")) / 1000,
                oom_kills: self.oom_kills(),
                pids,
            }
        }
    }

    /// Pids of every process left in the cgroup.
    pub fn procs(&self) -> Vec<u32> {
        fs::read_to_string(self.dir("pids").join("cgroup.procs"))
            .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// SIGKILLs everything in the cgroup (cgroup.kill on v2, one by one on v1).
    pub fn kill_all(&self) {
        if self.v2 && fs::write(self.dir("").join("cgroup.kill"), "1").is_ok() {
            return;
        }
        for pid in self.procs() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    /// Removes the cgroup; fails while processes remain.
    pub fn delete(&self) -> bool {
        self.cg.delete().is_ok() && !self.dirs.iter().any(|(_, d)| d.exists())
    }
}

//! Statistics over the samples and the markdown tables this benchmark prints.

use std::time::Duration;

use crate::celld_node::{CelldFacts, CelldStart, Footprint, RSS_TASK_CPU_MILLIS, RssReport};
use crate::oci_runtime::DENIED_SYSCALLS;
use crate::{Args, Machine, WARMUP, load1};

#[derive(Default)]
pub struct Samples {
    pub celld: Vec<CelldStart>,
    pub runc_create: Vec<Duration>,
    pub runc_start: Vec<Duration>,
    pub runc_run: Vec<Duration>,
    pub crun_create: Vec<Duration>,
    pub crun_start: Vec<Duration>,
    pub crun_run: Vec<Duration>,
}

#[derive(Clone, Copy)]
struct Summary {
    median: f64,
    p99: f64,
    mean: f64,
}

/// Median, nearest-rank p99 and mean, in milliseconds.
fn summarize(samples: impl IntoIterator<Item = Duration>) -> Summary {
    let mut ms: Vec<f64> = samples.into_iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    let n = ms.len().max(1);
    let rank = |q: f64| ms.get(((q * n as f64).ceil() as usize).clamp(1, n) - 1);
    Summary {
        median: rank(0.5).copied().unwrap_or(f64::NAN),
        p99: rank(0.99).copied().unwrap_or(f64::NAN),
        mean: ms.iter().sum::<f64>() / n as f64,
    }
}

fn mean_ms(values: impl Iterator<Item = i64>) -> f64 {
    let v: Vec<i64> = values.collect();
    v.iter().sum::<i64>() as f64 / v.len().max(1) as f64
}

fn latency_table(title: &str, rows: &[(&str, &str, Summary)], crun: Summary) {
    println!("{title}\n");
    println!(
        "| runtime | measured as | median ms | p99 ms | mean ms | median / crun | p99 / crun |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|");
    for (name, how, s) in rows {
        println!(
            "| {name} | {how} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
            s.median,
            s.p99,
            s.mean,
            s.median / crun.median,
            s.p99 / crun.p99
        );
    }
    println!();
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

pub fn print_report(
    args: &Args,
    machine: &Machine,
    facts: &CelldFacts,
    s: &Samples,
    after_starts: Footprint,
    rss: &RssReport,
) {
    let celld_start = summarize(s.celld.iter().map(|c| c.running));
    let celld_run = summarize(s.celld.iter().map(|c| c.dead));
    let runc_start = summarize(s.runc_start.iter().copied());
    let runc_run = summarize(s.runc_run.iter().copied());
    let crun_start = summarize(s.crun_start.iter().copied());
    let crun_run = summarize(s.crun_run.iter().copied());

    println!("## Results\n");
    println!(
        "Machine: {} CPUs ({}), {} MiB RAM, kernel {}; {}; 1-minute load {} at the start, \
         {} at the end. {} starts per runtime after {WARMUP} warm-up rounds, interleaved \
         (celld, runc create+start, runc run, crun create+start, crun run).\n",
        machine.nproc,
        machine.cpu_model,
        machine.mem_total_mib,
        machine.kernel,
        machine.date,
        machine.load_at_start,
        load1(),
        args.starts
    );
    latency_table(
        "### Start latency of /bin/true",
        &[
            (
                "celld",
                "RunTask call -> RUNNING seen on WatchTasks",
                celld_start,
            ),
            ("runc", "`runc create` + `runc start`", runc_start),
            ("crun", "`crun create` + `crun start`", crun_start),
        ],
        crun_start,
    );
    latency_table(
        "### Run-to-exit of /bin/true",
        &[
            (
                "celld",
                "RunTask call -> DEAD seen on WatchTasks",
                celld_run,
            ),
            ("runc", "`runc run` spawn -> exit", runc_run),
            ("crun", "`crun run` spawn -> exit", crun_run),
        ],
        crun_run,
    );

    let reply = summarize(s.celld.iter().map(|c| c.reply));
    let running_to_dead = summarize(s.celld.iter().map(|c| c.dead - c.running));
    let runc_create = summarize(s.runc_create.iter().copied());
    let crun_create = summarize(s.crun_create.iter().copied());
    println!("### Where the time goes\n");
    println!("| phase | median ms | p99 ms | mean ms |");
    println!("|---|---:|---:|---:|");
    for (name, x) in [
        ("celld: RunTask reply received", reply),
        ("celld: RUNNING seen -> DEAD seen", running_to_dead),
        ("runc: `create` alone", runc_create),
        ("crun: `create` alone", crun_create),
    ] {
        println!(
            "| {name} | {:.2} | {:.2} | {:.2} |",
            x.median, x.p99, x.mean
        );
    }
    println!(
        "| celld server clock (ms resolution): PENDING -> RUNNING | | | {:.2} |",
        mean_ms(s.celld.iter().map(|c| c.server_pending_to_running_ms))
    );
    println!(
        "| celld server clock (ms resolution): RUNNING -> DEAD | | | {:.2} |",
        mean_ms(s.celld.iter().map(|c| c.server_running_to_dead_ms))
    );
    println!();

    println!("### What each row enforced\n");
    println!("| runtime | namespaces | cgroup limits | seccomp | other |");
    println!("|---|---|---|---|---|");
    println!(
        "| celld | pid, mount, ipc, uts, net, cgroup | memory 64 MiB, cpu 500 millis, pids 64 \
         (cgroup {}) | {} calls EPERM + new user namespaces EPERM + clone3 ENOSYS | \
         14 default caps, masked/read-only paths, landlock ABI {} |",
        facts.cgroup_version,
        DENIED_SYSCALLS.len(),
        facts.landlock_abi
    );
    println!(
        "| runc | pid, mount, ipc, uts, net, cgroup | memory 64 MiB, cpu 500 millis, pids 64 \
         (cgroup v1), devices deny-all + defaults | {} calls EPERM | 14 default caps, \
         masked/read-only paths, no_new_privs; no landlock |",
        DENIED_SYSCALLS.len()
    );
    println!(
        "| crun | pid, mount, ipc, uts, net, cgroup | none: only placed in a cgroup2 \
         cgroup (this host's cgroup2 has no controllers) | {} calls EPERM | 14 default caps, \
         masked/read-only paths, no_new_privs; no landlock |",
        DENIED_SYSCALLS.len()
    );
    println!();

    println!("### celld resident memory (VmRSS of the celld process)\n");
    println!("| state | VmRSS MiB | VmHWM (peak) MiB | open fds |");
    println!("|---|---:|---:|---:|");
    let row = |state: String, f: Footprint| {
        println!(
            "| {state} | {} | {} | {} |",
            mib(f.rss_kib),
            mib(f.hwm_kib),
            f.fds
        );
    };
    row(
        "idle: fresh daemon, 1 s after its first RPC, no tasks".into(),
        rss.idle,
    );
    row(
        format!(
            "{} tasks of `sleep 600` running ({RSS_TASK_CPU_MILLIS} cpu millis each)",
            rss.running_tasks
        ),
        rss.running,
    );
    row(
        format!(
            "latency daemon after its {} starts (all ended, kept as DEAD)",
            args.starts + WARMUP
        ),
        after_starts,
    );
    println!();
    let third = celld_start.median <= crun_start.median / 3.0;
    println!(
        "celld median start {:.2} ms vs crun {:.2} ms: {} 1/3 of crun's. Idle RSS {} MiB: {} 10 MiB.",
        celld_start.median,
        crun_start.median,
        if third { "at most" } else { "more than" },
        mib(rss.idle.rss_kib),
        if rss.idle.rss_kib < 10 * 1024 {
            "under"
        } else {
            "not under"
        }
    );
}

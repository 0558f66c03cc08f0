//! `cargo bench -p celld --bench start`: how long celld takes to start `/bin/true` from a
//! busybox rootfs, next to runc and crun doing the same, and how much memory the agent
//! holds idle and with many running tasks. It prints markdown tables and asserts nothing
//! about time.
//!
//! It needs root, runc, crun and busybox. When it cannot measure a row it exits non-zero
//! and says why; it never prints a number it did not measure.
//!
//! Arguments (after `--`): `--starts N` (or `CELLD_BENCH_STARTS`, default 200) and
//! `--running N` (or `CELLD_BENCH_RUNNING`, default 100).
//!
//! Layout:
//! - `celld_node`: a celld daemon this program starts, driven over gRPC, each task
//!   transition timed from its `WatchTasks` stream; its RSS idle and with running tasks.
//! - `oci_runtime`: runc and crun on an equivalent bundle, each command timed from spawn to
//!   exit; crun runs from a thread in a private mount namespace with a fresh cgroup2 on
//!   /sys/fs/cgroup, because crun 1.8 refuses this host's v1 hybrid layout.
//! - `report`: median, p99, mean and the markdown tables.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

#[path = "start/celld_node.rs"]
mod celld_node;
#[path = "start/oci_runtime.rs"]
mod oci_runtime;
#[path = "start/report.rs"]
mod report;

use celld_node::{Celld, CelldFacts, Footprint, measure_rss};
use oci_runtime::{OciRuntime, PrivateCgroup2Thread};
use report::{Samples, print_report};

/// Every failure is a message for the person running the benchmark.
type Result<T> = std::result::Result<T, String>;

/// The limits every measured task gets, in every runtime that can enforce them.
const MEMORY_BYTES: u64 = 64 << 20;
const CPU_MILLIS: u64 = 500;
const PIDS_MAX: u64 = 64;
/// Starts per runtime before measuring: page cache, runtime binaries, first cgroups.
const WARMUP: usize = 5;

struct Args {
    starts: usize,
    running: usize,
}

fn count_from_env(name: &str, default: usize) -> Result<usize> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .map_err(|_| format!("{name}={v:?} is not a count: use a whole number such as 200")),
        Err(_) => Ok(default),
    }
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        starts: count_from_env("CELLD_BENCH_STARTS", 200)?,
        running: count_from_env("CELLD_BENCH_RUNNING", 100)?,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let slot = match flag.as_str() {
            // `cargo bench` passes this to every bench binary.
            "--bench" => continue,
            "--starts" => &mut args.starts,
            "--running" => &mut args.running,
            other => {
                return Err(format!(
                    "unknown argument {other:?}: use --starts N and --running N"
                ));
            }
        };
        let value = it.next().unwrap_or_default();
        *slot = value
            .parse()
            .map_err(|_| format!("{flag} needs a whole number, got {value:?}"))?;
    }
    if args.starts == 0 {
        return Err("--starts must be at least 1".into());
    }
    Ok(args)
}

fn main() -> ExitCode {
    let result = parse_args().and_then(|args| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("tokio runtime: {e}"))?;
        runtime.block_on(run(args))
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench start: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<()> {
    check_prerequisites()?;
    let machine = Machine::read();
    let work = tempfile::tempdir().map_err(|e| format!("temporary directory: {e}"))?;
    let rootfs = busybox_rootfs(work.path())?;
    let tag = std::process::id();
    let runc = OciRuntime::new("runc", work.path(), &rootfs, tag, true)?;
    let crun = OciRuntime::new("crun", work.path(), &rootfs, tag, false)?;
    let crun_thread = PrivateCgroup2Thread::start()?;

    let measured = measure_starts(&args, work.path(), &rootfs, &runc, &crun, &crun_thread).await;
    // The runtimes' parent cgroups go whether or not every start worked.
    runc.remove_cgroup_parent();
    let crun_for_cleanup = crun.clone();
    crun_thread.call(move || crun_for_cleanup.remove_cgroup_parent())?;
    let (facts, samples, after_starts) = measured?;

    let rss = measure_rss(work.path(), &rootfs, tag, args.running).await?;
    print_report(&args, &machine, &facts, &samples, after_starts, &rss);
    Ok(())
}

/// Rounds of one start per runtime, interleaved so that drift on the machine (page cache,
/// other load) touches every runtime alike. The first `WARMUP` rounds are not kept.
async fn measure_starts(
    args: &Args,
    work: &Path,
    rootfs: &Path,
    runc: &OciRuntime,
    crun: &OciRuntime,
    crun_thread: &PrivateCgroup2Thread,
) -> Result<(CelldFacts, Samples, Footprint)> {
    let tag = std::process::id();
    let mut celld = Celld::start(work, &format!("celld-bench-{tag}")).await?;
    let facts = celld.facts().await?;
    let mut events = celld.watch().await?;
    eprintln!(
        "bench start: {} starts per runtime after {WARMUP} warm-up rounds; celld is {}",
        args.starts,
        celld.binary.display()
    );
    let mut samples = Samples::default();
    for round in 0..WARMUP + args.starts {
        let id = format!("b{tag}-{round}");
        let c = celld.start_once(&mut events, rootfs, &id).await?;
        let (runc_create, runc_start) = runc.create_start(&format!("{id}-cs"))?;
        let runc_run = runc.run(&format!("{id}-r"))?;
        let crun_job = crun.clone();
        let crun_ids = (format!("{id}-cs"), format!("{id}-r"));
        let ((crun_create, crun_start), crun_run) = crun_thread.call(move || {
            Ok::<_, String>((
                crun_job.create_start(&crun_ids.0)?,
                crun_job.run(&crun_ids.1)?,
            ))
        })??;
        if round < WARMUP {
            continue;
        }
        samples.celld.push(c);
        samples.runc_create.push(runc_create);
        samples.runc_start.push(runc_create + runc_start);
        samples.runc_run.push(runc_run);
        samples.crun_create.push(crun_create);
        samples.crun_start.push(crun_create + crun_start);
        samples.crun_run.push(crun_run);
        let done = round + 1 - WARMUP;
        if done.is_multiple_of(50) {
            eprintln!("bench start: {done} rounds done");
        }
    }
    let after_starts = celld.footprint()?;
    Ok((facts, samples, after_starts))
}

fn check_prerequisites() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        let why = "this benchmark starts real containers (namespaces, cgroups) and needs root: \
                   run it as root";
        return Err(why.into());
    }
    if !Path::new("/bin/busybox").is_file() {
        return Err("/bin/busybox is missing: apt-get install -y busybox-static".into());
    }
    for tool in ["runc", "crun"] {
        let works = Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !works {
            return Err(format!(
                "{tool} is missing or does not run, so its row cannot be measured: \
                 apt-get install -y {tool}"
            ));
        }
    }
    Ok(())
}

/// A busybox rootfs in `dir`: the static binary, one symlink per applet, /etc/passwd.
fn busybox_rootfs(dir: &Path) -> Result<PathBuf> {
    let root = dir.join("rootfs");
    let io = |what: &str, e: std::io::Error| format!("building the rootfs ({what}): {e}");
    for d in ["bin", "proc", "dev", "sys", "tmp", "etc", "root"] {
        std::fs::create_dir_all(root.join(d)).map_err(|e| io(d, e))?;
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).map_err(|e| io("busybox", e))?;
    let list = Command::new("/bin/busybox")
        .arg("--list")
        .output()
        .map_err(|e| io("busybox --list", e))?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        // `busybox --list` names busybox itself; a symlink there would replace the binary.
        if applet != "busybox" {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))
                .map_err(|e| io(applet, e))?;
        }
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")
        .map_err(|e| io("etc/passwd", e))?;
    Ok(root)
}

struct Machine {
    nproc: usize,
    cpu_model: String,
    mem_total_mib: u64,
    kernel: String,
    date: String,
    /// /proc/loadavg's 1-minute figure when the run began: other work on the machine
    /// moves every row, so the report says how busy it was.
    load_at_start: String,
}

/// The 1-minute load average.
fn load1() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

impl Machine {
    fn read() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
            .unwrap_or_else(|| "unknown".into());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_total_mib = status_kib(&meminfo, "MemTotal:").unwrap_or(0) / 1024;
        let date = Command::new("date")
            .args(["-u", "+%Y-%m-%d %H:%M UTC"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        Machine {
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model,
            mem_total_mib,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
            date,
            load_at_start: load1(),
        }
    }
}

/// The number of a `Key:   123 kB` line of /proc/meminfo or /proc/PID/status.
fn status_kib(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

//! `cargo bench -p cellmaster --bench poll`: one master polling many simulated nodes over
//! gRPC, at one poll per node per second, on one core. It prints markdown tables (polls
//! per second, how many answers came within the interval, master CPU and RSS, time to
//! mark silent nodes Down) and asserts nothing about time.
//!
//! Several processes, all this binary: the driver (no role) starts the simulated fleet
//! (`--role sim`, shards of at most 5,000 nodes, all pinned to CPU 1) and the master (`--role master`, pinned to CPU 0, one
//! tokio thread), so the master's CPU time and RSS are its own. Addresses are
//! 127.1.X.Y:7100, one per node, which the kernel routes to loopback without setup.
//!
//! Arguments (after `--`): `--nodes 1000,10000`, `--window SECS` (10), `--warmup SECS`
//! (5), `--timeout-ms MS` (poller timeout, default 400: `PollPolicy`'s share of its
//! interval, 0.8 s of 2 s, at the benchmark's 1 s interval), `--max-in-flight N`
//! (default `PollPolicy`'s), `--change-every SECS` (10: about one full reply in ten),
//! `--silence K` (10), `--perf` (after the window, `perf record -g` the master for 5 s),
//! `--tls` (mutual TLS as deployed: a cell CA made for the run, a certificate per
//! simulated node naming its node id, the master's own client certificate).
//!
//! Layout:
//! - `sim`: the simulated nodes, a realistic 100-task status, silencing on command.
//! - `master`: the real `Poller` and `GrpcSource` with counting around them.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::{Child, ChildStdin, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cellmaster::poll::PollPolicy;
use prost::Message;

#[path = "poll/master.rs"]
mod master;
#[path = "poll/sim.rs"]
mod sim;

/// Every failure is a message for the person running the benchmark.
type Result<T> = std::result::Result<T, String>;

/// The master needs one descriptor per node, a simulator shard two (listener and
/// connection); the container's hard limit (20,000, without CAP_SYS_RESOURCE to raise
/// it) sets the shard size.
const SIM_SHARD: usize = 5_000;
const MASTER_CPU: usize = 0;
const SIM_CPU: usize = 1;
/// /proc reports CPU time in USER_HZ, which the kernel ABI fixes at 100 on Linux.
const USER_HZ: f64 = 100.0;

pub fn node_address(index: usize) -> SocketAddrV4 {
    let ip = Ipv4Addr::new(127, 1, (index / 250) as u8, (index % 250 + 1) as u8);
    SocketAddrV4::new(ip, 7100)
}

pub fn node_id(index: usize) -> String {
    format!("node-{index:05}")
}

pub fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

#[derive(Clone)]
struct Args {
    role: Option<String>,
    nodes: Vec<usize>,
    first: usize,
    fleet: usize,
    window: u64,
    warmup: u64,
    timeout_ms: u64,
    max_in_flight: usize,
    change_every: u64,
    silence: usize,
    perf: bool,
    tls: bool,
    /// Where the run's CA is (`ca.crt`, `ca.key`), for the children; set by the driver.
    ca_dir: Option<String>,
}

fn parse_args() -> Result<Args> {
    let defaults = PollPolicy::default();
    let mut args = Args {
        role: None,
        nodes: vec![1_000, 10_000],
        first: 0,
        fleet: 0,
        window: 10,
        warmup: 5,
        // The default policy's timeout is 40% of its interval; keep that share at the
        // benchmark's interval (the poller needs timeout <= interval / 2, see
        // src/poll/schedule.rs).
        timeout_ms: (master::INTERVAL.as_millis() * defaults.timeout.as_millis()
            / defaults.interval.as_millis()) as u64,
        max_in_flight: defaults.max_in_flight,
        change_every: 10,
        silence: 10,
        perf: false,
        tls: false,
        ca_dir: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--bench" {
            // `cargo bench` passes this to every bench binary.
            continue;
        }
        if flag == "--perf" {
            args.perf = true;
            continue;
        }
        if flag == "--tls" {
            args.tls = true;
            continue;
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = || -> Result<u64> {
            value
                .parse()
                .map_err(|_| format!("{flag} needs a whole number, got {value:?}"))
        };
        match flag.as_str() {
            "--role" => args.role = Some(value.clone()),
            "--nodes" => {
                args.nodes = value
                    .split(',')
                    .map(|n| {
                        n.parse()
                            .map_err(|_| format!("--nodes: {n:?} is not a count"))
                    })
                    .collect::<Result<_>>()?;
            }
            "--first" => args.first = number()? as usize,
            "--fleet" => args.fleet = number()? as usize,
            "--window" => args.window = number()?,
            "--warmup" => args.warmup = number()?,
            "--timeout-ms" => args.timeout_ms = number()?,
            "--max-in-flight" => args.max_in_flight = number()? as usize,
            "--change-every" => args.change_every = number()?.max(1),
            "--silence" => args.silence = number()? as usize,
            "--ca-dir" => args.ca_dir = Some(value.clone()),
            other => {
                return Err(format!(
                    "unknown argument {other:?}: see the top of master-shim/benches/poll.rs"
                ));
            }
        }
    }
    if args.nodes.iter().any(|&n| n == 0 || n > 250 * 250) {
        return Err("--nodes: each count must be 1..=62500 (127.1.X.Y addresses)".into());
    }
    Ok(args)
}

/// Raises the descriptor limit to the hard limit and pins this process (and every thread
/// it starts later) to one CPU.
fn prepare_process(cpu: usize) -> Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) =
        getrlimit(Resource::RLIMIT_NOFILE).map_err(|e| format!("getrlimit NOFILE: {e}"))?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
        .map_err(|e| format!("setrlimit NOFILE {hard}: {e}"))?;
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).map_err(|e| format!("cpu {cpu}: {e}"))?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
        .map_err(|e| format!("sched_setaffinity to cpu {cpu}: {e}"))
}

fn single_threaded() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))
}

fn main() -> ExitCode {
    let result = parse_args().and_then(|args| match args.role.as_deref() {
        Some("sim") => {
            prepare_process(SIM_CPU)?;
            single_threaded()?.block_on(sim::serve_fleet(sim::SimArgs {
                first: args.first,
                count: args.nodes[0],
                fleet: args.fleet,
                change_every: Duration::from_secs(args.change_every),
                ca: args.ca_dir.as_deref().map(load_ca).transpose()?,
            }))
        }
        Some("master") => {
            prepare_process(MASTER_CPU)?;
            let policy = PollPolicy {
                interval: master::INTERVAL,
                timeout: Duration::from_millis(args.timeout_ms),
                max_in_flight: args.max_in_flight,
                ..PollPolicy::default()
            };
            let nodes = args.nodes[0];
            let ca = args.ca_dir.as_deref().map(load_ca).transpose()?;
            single_threaded()?.block_on(master::poll_fleet(master::MasterArgs {
                nodes,
                policy,
                ca,
            }))
        }
        Some(other) => Err(format!("unknown role {other:?}: sim or master")),
        None => drive(&args),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("poll bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The run's cell CA, as the driver wrote it.
fn load_ca(dir: &str) -> Result<celld_trust::CellCa> {
    let read = |name: &str| {
        std::fs::read_to_string(format!("{dir}/{name}")).map_err(|e| format!("{dir}/{name}: {e}"))
    };
    celld_trust::CellCa::load(&read("ca.crt")?, &read("ca.key")?).map_err(|e| e.to_string())
}

/// A child in a role, spoken to by lines on stdin and stdout.
struct RoleProcess {
    name: &'static str,
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    backlog: VecDeque<String>,
}

impl RoleProcess {
    fn start(name: &'static str, args: &[String]) -> Result<Self> {
        let exe = std::env::current_exe().map_err(|e| format!("own executable: {e}"))?;
        let mut child = Command::new(exe)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("start {name}: {e}"))?;
        let stdin = child.stdin.take().ok_or("no stdin")?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            name,
            child,
            stdin,
            lines,
            backlog: VecDeque::new(),
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn send(&mut self, line: &str) -> Result<()> {
        writeln!(self.stdin, "{line}")
            .and_then(|_| self.stdin.flush())
            .map_err(|e| format!("{} stdin: {e}", self.name))
    }

    /// The next line starting with `prefix`; other lines wait in the backlog.
    fn wait_for(&mut self, prefix: &str, timeout: Duration) -> Result<String> {
        if let Some(at) = self.backlog.iter().position(|l| l.starts_with(prefix)) {
            return Ok(self.backlog.remove(at).unwrap_or_default());
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return Ok(line),
                Ok(line) => self.backlog.push_back(line),
                Err(_) => {
                    return Err(format!(
                        "{} did not say {prefix:?} within {timeout:?} (exited or stuck)",
                        self.name
                    ));
                }
            }
        }
    }
}

impl Drop for RoleProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("/proc/{pid}/stat: {e}"))?;
    // Fields after the command name, which ends at the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok((ticks(11) + ticks(12)) as f64 / USER_HZ)
}

/// VmRSS and VmHWM in MiB.
fn memory_mib(pid: u32) -> Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("/proc/{pid}/status: {e}"))?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
            .unwrap_or(0.0)
    };
    Ok((field("VmRSS:"), field("VmHWM:")))
}

fn json_field(report: &str, name: &str) -> f64 {
    let json = report.strip_prefix("report ").unwrap_or(report);
    serde_json::from_str::<serde_json::Value>(json)
        .ok()
        .and_then(|v| v.get(name).and_then(|x| x.as_f64()))
        .unwrap_or(f64::NAN)
}

struct Steady {
    nodes: usize,
    report: String,
    master_cpu: f64,
    sim_cpu: f64,
    rss: (f64, f64),
}

struct DownTimes {
    nodes: usize,
    /// (node index, how it was silenced, seconds from silence to Down) per silenced node.
    found: Vec<(usize, String, Option<f64>)>,
    report: String,
}

fn run_scale(args: &Args, nodes: usize) -> Result<(Steady, DownTimes)> {
    let common = |role: &str, first: usize, count: usize| -> Vec<String> {
        let ca: Vec<&str> = match &args.ca_dir {
            Some(dir) => vec!["--ca-dir", dir],
            None => vec![],
        };
        [
            "--role",
            role,
            "--first",
            &first.to_string(),
            "--nodes",
            &count.to_string(),
            "--fleet",
            &nodes.to_string(),
            "--timeout-ms",
            &args.timeout_ms.to_string(),
            "--max-in-flight",
            &args.max_in_flight.to_string(),
            "--change-every",
            &args.change_every.to_string(),
        ]
        .iter()
        .chain(&ca)
        .map(|s| s.to_string())
        .collect()
    };
    let mut sims = Vec::new();
    for first in (0..nodes).step_by(SIM_SHARD) {
        let count = SIM_SHARD.min(nodes - first);
        sims.push(RoleProcess::start(
            "simulator",
            &common("sim", first, count),
        )?);
    }
    for sim in &mut sims {
        sim.wait_for("ready", Duration::from_secs(120))?;
    }
    let sims_cpu =
        |sims: &[RoleProcess]| -> Result<f64> { sims.iter().map(|s| cpu_seconds(s.pid())).sum() };
    let mut master = RoleProcess::start("master", &common("master", 0, nodes))?;
    master.wait_for("all_ready", Duration::from_secs(120))?;
    std::thread::sleep(Duration::from_secs(args.warmup));

    // The steady window.
    master.send("reset")?;
    let (m0, s0) = (cpu_seconds(master.pid())?, sims_cpu(&sims)?);
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(args.window));
    master.send("report")?;
    let (m1, s1) = (cpu_seconds(master.pid())?, sims_cpu(&sims)?);
    let seconds = t0.elapsed().as_secs_f64();
    let report = master.wait_for("report", Duration::from_secs(10))?;
    let steady = Steady {
        nodes,
        report,
        master_cpu: (m1 - m0) / seconds,
        sim_cpu: (s1 - s0) / seconds,
        rss: memory_mib(master.pid())?,
    };
    if args.perf {
        record_profile(master.pid(), nodes)?;
    }

    // Silence some nodes and time the master's Down for each.
    // Spread over the fleet so they sit at different offsets of the master's round;
    // every other one hangs, the rest close.
    let count = args.silence.min(nodes);
    let mut found: Vec<(usize, String, Option<f64>)> = (0..count)
        .map(|k| {
            let kind = if k % 2 == 0 { "hung" } else { "closed" };
            (
                k * nodes / count + nodes / (2 * count),
                kind.to_string(),
                None,
            )
        })
        .collect();
    let targets: Vec<String> = found.iter().map(|f| format!("{}:{}", f.0, f.1)).collect();
    master.send("reset")?;
    let mut at = u64::MAX;
    for sim in &mut sims {
        sim.send(&format!("silence {}", targets.join(",")))?;
    }
    // Shards silence within microseconds of each other; the earliest is the start.
    for sim in &mut sims {
        let line = sim.wait_for("silenced", Duration::from_secs(10))?;
        let when = line.split_whitespace().nth(1).and_then(|w| w.parse().ok());
        at = at.min(when.unwrap_or(u64::MAX));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while found.iter().any(|f| f.2.is_none()) && Instant::now() < deadline {
        let Ok(line) = master.wait_for("down ", Duration::from_secs(1)) else {
            continue;
        };
        let mut w = line.split_whitespace().skip(1);
        let (Some(id), Some(when)) = (w.next(), w.next().and_then(|t| t.parse::<u64>().ok()))
        else {
            continue;
        };
        // A Down from before the silence is an overloaded master giving up on a healthy
        // node, not detection.
        if when < at {
            continue;
        }
        if let Some(f) = found.iter_mut().find(|f| node_id(f.0) == id) {
            f.2 = Some(when.saturating_sub(at) as f64 / 1e6);
        }
    }
    master.send("report")?;
    let report = master.wait_for("report", Duration::from_secs(10))?;
    Ok((
        steady,
        DownTimes {
            nodes,
            found,
            report,
        },
    ))
}

/// `perf record -g` on the master for 5 s, into target/poll-perf-N.data.
fn record_profile(pid: u32, nodes: usize) -> Result<()> {
    let out = format!(
        "{}/../target/poll-perf-{nodes}.data",
        env!("CARGO_MANIFEST_DIR")
    );
    let status = Command::new("perf")
        .args([
            "record",
            "-F",
            "999",
            "-g",
            "-o",
            &out,
            "-p",
            &pid.to_string(),
        ])
        .args(["--", "sleep", "5"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| format!("perf: {e} (apt-get install -y linux-perf)"))?;
    if !status.success() {
        return Err(format!("perf record exited with {status}"));
    }
    eprintln!("profile of the master at {nodes} nodes: {out}");
    Ok(())
}

fn drive(args: &Args) -> Result<()> {
    let mut args_with_ca;
    let _ca_dir;
    let args = if args.tls {
        let dir = tempfile::tempdir().map_err(|e| format!("temporary directory: {e}"))?;
        let (ca, key) = celld_trust::CellCa::create("poll-bench").map_err(|e| e.to_string())?;
        std::fs::write(dir.path().join("ca.crt"), ca.cert_pem())
            .and_then(|()| std::fs::write(dir.path().join("ca.key"), key))
            .map_err(|e| format!("writing the CA: {e}"))?;
        args_with_ca = args.clone();
        args_with_ca.ca_dir = Some(dir.path().display().to_string());
        _ca_dir = dir;
        &args_with_ca
    } else {
        args
    };
    let status = sim::realistic_status();
    let unchanged = celld_proto::v1::NodeStatus {
        generation: 12,
        unchanged: true,
        ..Default::default()
    };
    println!(
        "Transport: {}. Reply sizes: full {} bytes ({} tasks), unchanged {} bytes; full replies \
         about 1 in {} (each node's generation moves every {} s). Poller: interval {:?}, \
         timeout {} ms, max in flight {}, unknown after {}, down after {}.\n",
        if args.tls {
            "mutual TLS 1.3 (ECDSA P-256 certificates)"
        } else {
            "plain text (--insecure)"
        },
        status.encoded_len(),
        status.tasks.len(),
        unchanged.encoded_len(),
        args.change_every,
        args.change_every,
        master::INTERVAL,
        args.timeout_ms,
        args.max_in_flight,
        PollPolicy::default().unknown_after,
        PollPolicy::default().down_after,
    );
    let mut results = Vec::new();
    for &nodes in &args.nodes {
        eprintln!("measuring {nodes} nodes ...");
        results.push(run_scale(args, nodes)?);
    }
    print_steady(&results.iter().map(|r| &r.0).collect::<Vec<_>>());
    print_down(&results.iter().map(|r| &r.1).collect::<Vec<_>>());
    Ok(())
}

fn print_steady(rows: &[&Steady]) {
    println!("### Steady state, one poll per node per second, master on one core\n");
    println!(
        "| nodes | polls/s | of target | answered again within 1.1 s | gap p50 / p99 / max \
         | full replies | master CPU | master RSS / HWM | simulator CPU |"
    );
    println!("|---:|---:|---:|---:|---|---:|---:|---|---:|");
    for r in rows {
        let f = |name| json_field(&r.report, name);
        let rate = f("answered") / f("seconds");
        println!(
            "| {} | {:.0} | {:.1}% | {:.1}% | {:.0} / {:.0} / {:.0} ms | {:.1}% | {:.0}% | \
             {:.0} / {:.0} MiB | {:.0}% |",
            r.nodes,
            rate,
            100.0 * rate / r.nodes as f64,
            100.0 * f("gaps_met") / f("gaps"),
            f("gap_p50_ms"),
            f("gap_p99_ms"),
            f("gap_max_ms"),
            100.0 * f("full") / f("answered"),
            100.0 * r.master_cpu,
            r.rss.0,
            r.rss.1,
            100.0 * r.sim_cpu,
        );
    }
    println!();
}

fn print_down(rows: &[&DownTimes]) {
    let interval = master::INTERVAL.as_secs_f64();
    println!("### Silence to Down (down after 3 missed polls)\n");
    println!(
        "| nodes | silenced | Down after, intervals: min / median / max | all within 3 \
         | polls/s meanwhile (of target) | gap max meanwhile |"
    );
    println!("|---:|---|---|---|---:|---:|");
    for r in rows {
        for kind in ["hung", "closed"] {
            let mut times: Vec<f64> = r
                .found
                .iter()
                .filter(|f| f.1 == kind)
                .filter_map(|f| f.2)
                .map(|s| s / interval)
                .collect();
            let total = r.found.iter().filter(|f| f.1 == kind).count();
            times.sort_by(f64::total_cmp);
            let f = |name| json_field(&r.report, name);
            let rate = f("answered") / f("seconds");
            let spread = if times.is_empty() {
                "none seen in 30 s".to_string()
            } else {
                format!(
                    "{:.2} / {:.2} / {:.2}{}",
                    times[0],
                    times[times.len() / 2],
                    times[times.len() - 1],
                    if times.len() < total {
                        format!(" ({} of {total} never)", total - times.len())
                    } else {
                        String::new()
                    }
                )
            };
            let within = times.len() == total && times.iter().all(|&t| t <= 3.0);
            println!(
                "| {} | {total} {kind} | {spread} | {} | {:.0} ({:.1}%) | {:.0} ms |",
                r.nodes,
                if within { "yes" } else { "no" },
                rate,
                100.0 * rate / r.nodes as f64,
                f("gap_max_ms"),
            );
        }
    }
    println!();
}

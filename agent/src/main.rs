//! `celld`: the node agent. PID 1 inside a celld image, a daemon anywhere else.

use std::process::ExitCode;
use std::time::Instant;

use celld::config::NodeConfig;
use celld::register::Join;
use celld::serve::{Options, build_agent, serve, start_reaper, stop_all_tasks};
use celld::task::state::Reason;
use celld_trust::{ServerTls, Transport};

const USAGE: &str = "usage: celld [--listen ADDR] [--config FILE] [--state-dir DIR] \
                     [--cgroup-parent NAME] [--image-version V] [--master HOST:PORT] [--master-key HEX] [--hostname NAME] \
                     [--join TOKEN] [--ca SHA256] [--insecure] | --version";

struct Args {
    listen: Option<String>,
    config: Option<String>,
    state_dir: Option<String>,
    cgroup_parent: Option<String>,
    image_version: Option<String>,
    master: Option<String>,
    master_key: Option<String>,
    hostname: Option<String>,
    join: Option<String>,
    ca: Option<String>,
    insecure: bool,
}

fn parse_args(args: &[String]) -> Result<Args, String> {
    let mut a = Args {
        listen: None,
        config: None,
        state_dir: None,
        cgroup_parent: None,
        image_version: None,
        master: None,
        master_key: None,
        hostname: None,
        join: None,
        ca: None,
        insecure: false,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        if flag == "--insecure" {
            a.insecure = true;
            continue;
        }
        let slot = match flag.as_str() {
            "--join" => &mut a.join,
            "--ca" => &mut a.ca,
            "--listen" => &mut a.listen,
            "--config" => &mut a.config,
            "--state-dir" => &mut a.state_dir,
            "--cgroup-parent" => &mut a.cgroup_parent,
            "--image-version" => &mut a.image_version,
            "--master" => &mut a.master,
            "--master-key" => &mut a.master_key,
            "--hostname" => &mut a.hostname,
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        };
        let value = it
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        *slot = Some(value.clone());
    }
    Ok(a)
}

/// Config for daemon mode: file, then flags. Any error is fatal here (not PID 1).
fn daemon_config(a: &Args) -> Result<NodeConfig, String> {
    let mut cfg = match &a.config {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).map_err(|e| format!("--config {path}: {e}"))?;
            NodeConfig::from_toml(&text).map_err(|e| format!("--config {path}: {e}"))?
        }
        None => NodeConfig::default(),
    };
    if let Some(v) = &a.listen {
        cfg.listen = v.clone();
    }
    if let Some(v) = &a.state_dir {
        cfg.state_dir = v.into();
    }
    if let Some(v) = &a.cgroup_parent {
        cfg.cgroup_parent = v.clone();
    }
    if let Some(v) = &a.image_version {
        cfg.image_version = v.clone();
    }
    if let Some(v) = &a.master {
        cfg.master = v.clone();
    }
    if let Some(v) = &a.master_key {
        cfg.master_key = v.clone();
    }
    if let Some(v) = &a.hostname {
        cfg.hostname = v.clone();
    }
    if let Some(v) = &a.join {
        cfg.join = v.clone();
    }
    if let Some(v) = &a.ca {
        cfg.ca = v.clone();
    }
    cfg.insecure |= a.insecure;
    cfg.check()
        .map_err(|e| e.to_string().replace("node config: ", "--"))?;
    Ok(cfg)
}

/// Config for PID 1: never fails; problems are kept for status and the console.
fn pid1_config() -> (NodeConfig, Vec<String>) {
    let mut errors = Vec::new();
    let mut cfg = match std::fs::read_to_string("/etc/celld/node.toml") {
        Ok(text) => NodeConfig::from_toml(&text).unwrap_or_else(|e| {
            errors.push(format!("/etc/celld/node.toml: {e}"));
            NodeConfig::default()
        }),
        Err(_) => NodeConfig::default(),
    };
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    errors.extend(cfg.apply_cmdline(&cmdline));
    (cfg, errors)
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("__task-init") {
        celld::task::child::run();
    }
    if argv.get(1).map(String::as_str) == Some("--version") {
        println!("celld {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    let started = Instant::now();
    let pid1 = std::process::id() == 1;
    let logs = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, not the serial console's log.
        .with_ansi(!pid1 && std::io::IsTerminal::is_terminal(&std::io::stderr()));
    // RUST_LOG, else INFO with the h2 crate at ERROR: h2 warns once for every connection it
    // sends GOAWAY for a flood (rapid resets, broken requests), a line per attacking
    // connection on a 115200-baud console. The flood is cut off either way.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(celld_trust::DEFAULT_LOG_FILTER));
    logs.with_env_filter(filter).init();
    let mut init_errors = Vec::new();
    if pid1 {
        // The panic path: a panic that reaches main ends in `fatal` (log, sync, reboot);
        // this hook makes sure its message reaches the console first.
        std::panic::set_hook(Box::new(|info| eprintln!("celld: PANIC: {info}")));
        if let Err(e) = celld::init::leave_initramfs_root() {
            init_errors.push(format!("leaving the initramfs root: {e}"));
        }
        init_errors.extend(celld::init::mount_system());
        if let Err(e) = celld::init::route_ctrl_alt_del() {
            init_errors.push(e);
        }
    }
    let uptime_at_start = celld::node::uptime_seconds();
    let (config, mut config_errors) = if pid1 {
        pid1_config()
    } else {
        let args = match parse_args(&argv[1..]) {
            Ok(a) => a,
            Err(e) => {
                eprintln!("celld: {e}");
                return ExitCode::from(2);
            }
        };
        match daemon_config(&args) {
            Ok(c) => (c, Vec::new()),
            Err(e) => {
                eprintln!("celld: {e}");
                return ExitCode::from(2);
            }
        }
    };
    config_errors.extend(init_errors);
    for e in &config_errors {
        tracing::error!(error = %e, "configuration problem (defaults kept)");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fatal(pid1, &format!("tokio runtime: {e}")),
    };
    let opts = Options {
        config,
        config_errors,
        mode: if pid1 { "pid1" } else { "daemon" },
        started,
        uptime_at_start,
    };
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        runtime.block_on(run(opts, pid1))
    }));
    match outcome {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => fatal(pid1, &e),
        Err(_) => fatal(pid1, "panic in the main task"),
    }
}

/// A daemon exits non-zero; PID 1 must not exit, so it logs, syncs and reboots.
fn fatal(pid1: bool, msg: &str) -> ExitCode {
    eprintln!("celld: {msg}");
    if pid1 {
        eprintln!("celld: rebooting in 5 s");
        std::thread::sleep(std::time::Duration::from_secs(5));
        let e = celld::init::power(false);
        eprintln!("celld: {e}");
        loop {
            std::thread::park();
        }
    }
    ExitCode::FAILURE
}

/// DHCP on every NIC with carrier, or the kernel's `ip=`; a bad `ip=` falls back to DHCP.
async fn bring_up_network() -> celld::net::NetHandle {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let mut cfg = celld::net::NetConfig {
        hostname: nix::unistd::gethostname()
            .ok()
            .map(|h| h.to_string_lossy().into_owned()),
        ..Default::default()
    };
    match celld::net::parse_ip_param(&cmdline) {
        Ok(Some(param)) => cfg.param = param,
        Ok(None) => {}
        Err(e) => tracing::error!(error = %e, "kernel command line ip= ignored; using DHCP"),
    }
    let handle = celld::net::bring_up(&cfg).await;
    for i in handle.report().interfaces {
        tracing::info!(
            interface = %i.name,
            mac = %i.mac,
            address = ?i.address,
            gateway = ?i.gateway,
            error = ?i.error,
            "network"
        );
    }
    handle
}

async fn run(opts: Options, pid1: bool) -> Result<(), String> {
    let runtime_ms = opts.started.elapsed().as_secs_f64() * 1000.0;
    if pid1 {
        let macs = celld::node::identity().macs;
        if let Err(e) = celld::init::set_hostname(&opts.config.hostname, &macs) {
            tracing::error!(error = %e, "hostname");
        }
        if let Err(e) = celld::sys::loopback_up() {
            tracing::error!(error = %e, "loopback");
        }
        // DHCP runs beside the rest of start-up; celld serves on 0.0.0.0 and is
        // reachable as soon as the lease lands. Leases renew on their own tasks.
        tokio::spawn(async move {
            drop(bring_up_network().await);
        });
    }
    let agent = build_agent(&opts).map_err(|e| e.to_string())?;
    let transport = if opts.config.insecure {
        for _ in 0..3 {
            tracing::warn!("{}", celld_trust::INSECURE_WARNING);
        }
        Transport::Plain
    } else {
        if opts.config.master.is_empty() || opts.config.ca.is_empty() {
            tracing::error!(
                "TLS without a master and CA fingerprint (celld.master=, celld.ca=, \
                 celld.join=): no certificate can be had, so no caller is served; give \
                 them, or insecure for development"
            );
        }
        Transport::Tls(ServerTls::new(None))
    };
    let agent_ms = opts.started.elapsed().as_secs_f64() * 1000.0;
    start_reaper(agent.supervisor.clone()).map_err(|e| e.to_string())?;
    let listener = tokio::net::TcpListener::bind(&opts.config.listen)
        .await
        .map_err(|e| format!("listen on {}: {e}", opts.config.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let init_to_ready = opts.started.elapsed().as_secs_f64();
    let boot_to_ready = if pid1 {
        celld::node::uptime_seconds()
    } else {
        0.0
    };
    agent.set_ready(boot_to_ready, init_to_ready);
    tracing::info!(
        %addr,
        mode = opts.mode,
        init_to_ready_ms = init_to_ready * 1000.0,
        runtime_at_ms = runtime_ms,
        agent_at_ms = agent_ms,
        boot_to_ready_s = boot_to_ready,
        kernel_to_init_s = opts.uptime_at_start,
        "celld serving"
    );
    let join = match &transport {
        Transport::Tls(server) if !opts.config.ca.is_empty() => Some(Join {
            token: opts.config.join.clone(),
            ca_fingerprint: opts.config.ca.clone(),
            server: server.clone(),
        }),
        _ => None,
    };
    if !opts.config.master.is_empty() && (join.is_some() || opts.config.insecure) {
        let labels = opts.config.labels.clone().into_iter().collect();
        tokio::spawn(celld::register::register_until_done(
            opts.config.master.clone(),
            agent.clone(),
            addr.port(),
            labels,
            join,
        ));
    }
    let power = agent.power.clone();
    let mut requested = power.subscribe();
    let supervisor = agent.supervisor.clone();
    let shutdown = async move {
        use celld::api::Power;
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int), Ok(mut pwr)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::from_raw(libc::SIGPWR)),
        ) else {
            return std::future::pending().await;
        };
        // As PID 1, SIGINT is ctrl-alt-del: a reboot. SIGTERM and SIGPWR power off.
        let choice = tokio::select! {
            _ = term.recv() => Power::Poweroff,
            _ = pwr.recv() => Power::Poweroff,
            _ = int.recv() => Power::Reboot,
            _ = requested.changed() => requested.borrow().unwrap_or(Power::Poweroff),
        };
        tracing::info!(?choice, "shutting down: stopping tasks");
        power.send_replace(Some(choice));
    };
    serve(agent.clone(), listener, transport, shutdown)
        .await
        .map_err(|e| e.to_string())?;
    stop_all_tasks(&supervisor, Reason::NodeShutdown).await;
    if pid1 {
        let how = agent.power.borrow().unwrap_or(celld::api::Power::Poweroff);
        tracing::info!(
            ?how,
            poweroff = how == celld::api::Power::Poweroff,
            "tasks stopped; syncing"
        );
        let e = match how {
            celld::api::Power::Kexec => celld::init::kexec_reboot(),
            celld::api::Power::Reboot => celld::init::power(false),
            celld::api::Power::Poweroff => celld::init::power(true),
        };
        return Err(e);
    }
    Ok(())
}

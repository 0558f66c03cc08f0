//! celld::net against real kernel objects: a veth pair between two network namespaces,
//! dnsmasq serving DHCP on one end, celld's client on the other. Needs root (and `ip`,
//! `dnsmasq`); without them the tests fail and say so.
//!
//! The client side runs in this same test binary, re-executed under `ip netns exec` with
//! CELLD_NET_TEST_ROLE set: that gives it the namespace's own /sys/class/net, as PID 1
//! sees it on a node.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use celld::net::{self, IpParam, NetConfig, NetReport, Source};

const ROLE: &str = "CELLD_NET_TEST_ROLE";
const DIR: &str = "CELLD_NET_TEST_DIR";

fn require_root_and_tools() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test creates network namespaces and veth pairs and needs root; run it as root \
         (CI does) instead of skipping it"
    );
    for tool in ["ip", "dnsmasq", "ping"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            found,
            "{tool} is missing: apt-get install -y iproute2 dnsmasq iputils-ping"
        );
    }
}

/// Runs a command and returns its stdout; panics with its stderr if it fails.
fn run(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Namespaces and processes of one test; all removed on drop, also when the test fails.
struct Lab {
    namespaces: Vec<String>,
    processes: Vec<Child>,
    dir: tempfile::TempDir,
}

impl Lab {
    fn new(namespaces: &[&str]) -> Self {
        let lab = Self {
            namespaces: namespaces.iter().map(|s| s.to_string()).collect(),
            processes: Vec::new(),
            dir: tempfile::tempdir().unwrap(),
        };
        for ns in namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).output(); // a leftover
            run(&["ip", "netns", "add", ns]);
            run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        lab
    }

    /// A veth pair from `a_ns`/`a` to `b_ns`/`b`; `a` gets `a_addr` and both ends go up
    /// on the `a` side (`b` is left to the client: bringing it up is the client's job).
    fn veth(&self, a_ns: &str, a: &str, a_addr: &str, b_ns: &str, b: &str) {
        run(&[
            "ip", "-n", a_ns, "link", "add", a, "type", "veth", "peer", "name", b, "netns", b_ns,
        ]);
        run(&["ip", "-n", a_ns, "addr", "add", a_addr, "dev", a]);
        run(&["ip", "-n", a_ns, "link", "set", a, "up"]);
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Re-runs `test` of this binary in `ns` as `role` with `env`; returns its output.
    fn run_client(&self, ns: &str, test: &str, role: &str, env: &[(&str, &str)]) -> String {
        self.spawn_client(ns, test, role, env).finish()
    }

    fn spawn_client(&self, ns: &str, test: &str, role: &str, env: &[(&str, &str)]) -> ClientRun {
        let out_path = self.path(&format!("{role}.out"));
        let out = std::fs::File::create(&out_path).unwrap();
        let exe = std::env::current_exe().unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(exe)
            .args([test, "--exact", "--nocapture", "--test-threads=1"])
            .env(ROLE, role)
            .env(DIR, self.dir.path())
            .envs(env.iter().copied())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        ClientRun {
            child,
            out: out_path,
            ns: ns.to_string(),
        }
    }

    /// Starts dnsmasq on `iface` in `ns`, logging to `log`; returns once it serves.
    fn start_dnsmasq(&mut self, ns: &str, iface: &str, log: &Path, args: &[&str]) -> usize {
        let dnsmasq = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns,
                "dnsmasq",
                "--no-daemon",
                "--conf-file=/dev/null",
            ])
            .arg(format!("--interface={iface}"))
            .args([
                "--bind-interfaces",
                "--port=0",
                "--log-dhcp",
                "--log-facility=-",
            ])
            // dnsmasq otherwise holds the first OFFER ~3 s for an ICMP probe of the
            // address; the time to address printed by the tests should be the client's.
            .arg("--no-ping")
            .args(args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .expect("start dnsmasq");
        self.processes.push(dnsmasq);
        wait_for_text(log, "DHCP, IP range", Duration::from_secs(5));
        self.processes.len() - 1
    }

    fn stop_process(&mut self, index: usize) {
        let p = &mut self.processes[index];
        let _ = p.kill();
        let _ = p.wait();
    }
}

/// Waits until `path` contains `text`; panics with what it does contain otherwise.
fn wait_for_text(path: &Path, text: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let now = std::fs::read_to_string(path).unwrap_or_default();
        if now.contains(text) {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "{} has no {text:?} after {timeout:?}:\n{now}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A client re-run of this binary; killed if the test fails before it finishes.
struct ClientRun {
    child: Child,
    out: PathBuf,
    ns: String,
}

impl ClientRun {
    fn finish(mut self) -> String {
        let timeout = Duration::from_secs(60);
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break Some(s);
            }
            if Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let text = std::fs::read_to_string(&self.out).unwrap();
        let ns = &self.ns;
        match status {
            Some(s) if s.success() => text,
            Some(s) => panic!("client in {ns} failed ({s}):\n{text}"),
            None => panic!("client in {ns} did not finish in {timeout:?}:\n{text}"),
        }
    }
}

impl Drop for ClientRun {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for p in &mut self.processes {
            let _ = p.kill();
            let _ = p.wait();
        }
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// What follows `key` on the first line the client printed with it, split into words
/// (the test harness may have printed "test name ... " before it on the same line).
fn line<'a>(out: &'a str, key: &str) -> Vec<&'a str> {
    out.lines()
        .find_map(|l| l.split_once(key).map(|(_, rest)| rest))
        .unwrap_or_else(|| panic!("client printed no {key:?} line:\n{out}"))
        .split_whitespace()
        .collect()
}

fn print_report(r: &NetReport) {
    for i in &r.interfaces {
        println!("CONSOLE {i}");
        println!(
            "REPORT {} {} {} {} {} {} {} {}",
            i.name,
            i.address.map_or("-".into(), |a| a.to_string()),
            i.prefix_len,
            i.gateway.map_or("-".into(), |a| a.to_string()),
            i.lease_secs.map_or("-".into(), |l| l.to_string()),
            i.server.map_or("-".into(), |a| a.to_string()),
            i.time_to_address
                .map_or("-".into(), |t| t.as_millis().to_string()),
            i.renewals,
        );
    }
    if let Some(e) = &r.error {
        println!("ERROR {e}");
    }
}

fn client_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Client side of the DHCP test: get a lease, wait for one renewal.
fn dhcp_client(dir: &Path) {
    client_runtime().block_on(async {
        let cfg = NetConfig {
            hostname: Some("celld-test".into()),
            resolv_conf: Some(dir.join("resolv.conf")),
            dhcp_timeout: Duration::from_secs(20),
            ..NetConfig::default()
        };
        let handle = net::bring_up(&cfg).await;
        let report = handle.report();
        print_report(&report);
        assert_eq!(report.interfaces.len(), 1, "{report:?}");
        let iface = &report.interfaces[0];
        assert_eq!(iface.source, Source::Dhcp, "{iface}");
        assert!(iface.error.is_none(), "{iface}");
        let mut watch = handle.watch();
        let renewed = tokio::time::timeout(
            Duration::from_secs(30),
            watch.wait_for(|r| r.interfaces[0].renewals >= 1),
        )
        .await;
        assert!(
            renewed.is_ok(),
            "no renewal within 30 s: {:?}",
            handle.report()
        );
        print_report(&handle.report());
        println!("RENEWED");
        handle.stop();
    });
}

#[test]
fn dhcp_gets_address_route_dns_and_renews() {
    if std::env::var(ROLE).as_deref() == Ok("dhcp") {
        return dhcp_client(Path::new(&std::env::var(DIR).unwrap()));
    }
    require_root_and_tools();
    let pid = std::process::id();
    let (srv_ns, cli_ns) = (format!("celld-dhs-{pid}"), format!("celld-dhc-{pid}"));
    let (srv_if, cli_if) = (format!("dhs{pid}"), format!("dhc{pid}"));
    let mut lab = Lab::new(&[&srv_ns, &cli_ns]);
    lab.veth(&srv_ns, &srv_if, "10.77.0.1/24", &cli_ns, &cli_if);
    let log_path = lab.path("dnsmasq.log");
    let leases = format!("--dhcp-leasefile={}", lab.path("leases").display());
    lab.start_dnsmasq(
        &srv_ns,
        &srv_if,
        &log_path,
        &[
            // dnsmasq's shortest lease is 2 minutes; T1/T2 make the client renew in seconds.
            "--dhcp-range=10.77.0.50,10.77.0.60,255.255.255.0,2m",
            "--dhcp-option=option:T1,4",
            "--dhcp-option=option:T2,8",
            "--dhcp-option=option:router,10.77.0.1",
            "--dhcp-option=option:dns-server,10.77.0.53",
            &leases,
        ],
    );
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();

    let test = "dhcp_gets_address_route_dns_and_renews";
    let out = lab.run_client(&cli_ns, test, "dhcp", &[]);
    println!("{out}");
    let first = line(&out, "REPORT ");
    let address: Ipv4Addr = first[1].parse().unwrap();
    assert!(
        (Ipv4Addr::new(10, 77, 0, 50)..=Ipv4Addr::new(10, 77, 0, 60)).contains(&address),
        "{address} is outside dnsmasq's range"
    );
    assert_eq!(
        &first[2..6],
        ["24", "10.77.0.1", "120", "10.77.0.1"],
        "prefix, gateway, lease, server"
    );
    println!("DHCP time to address: {} ms", first[6]);
    assert!(out.contains("RENEWED"), "{out}");

    let addrs = run(&["ip", "-n", &cli_ns, "-4", "addr", "show", "dev", &cli_if]);
    assert!(addrs.contains(&format!("inet {address}/24")), "{addrs}");
    let routes = run(&["ip", "-n", &cli_ns, "route"]);
    assert!(
        routes.contains(&format!("default via 10.77.0.1 dev {cli_if} proto dhcp")),
        "no default route via the DHCP router:\n{routes}"
    );
    let resolv = std::fs::read_to_string(lab.path("resolv.conf")).unwrap();
    assert!(resolv.contains("nameserver 10.77.0.53"), "{resolv}");

    let log = log();
    println!("dnsmasq log:\n{log}");
    let acks = log.matches(&format!("DHCPACK({srv_if}) {address}")).count();
    assert!(
        acks >= 2,
        "dnsmasq acknowledged {acks} times, want the lease and a renewal:\n{log}"
    );
    assert!(
        log.contains("client provides name: celld-test"),
        "hostname not sent:\n{log}"
    );
    run(&[
        "ip",
        "netns",
        "exec",
        &cli_ns,
        "ping",
        "-c1",
        "-W2",
        "10.77.0.1",
    ]);
}

/// Client side of the static test: `ip=` from a command line.
fn static_client(dir: &Path, device: &str) {
    client_runtime().block_on(async {
        let cmdline = format!(
            "console=ttyS0 ip=10.78.0.5::10.78.0.1:255.255.255.0:node-s:{device}:off:10.78.0.53"
        );
        let param = net::parse_ip_param(&cmdline).unwrap().unwrap();
        assert!(matches!(param, IpParam::Static(_)));
        let cfg = NetConfig {
            param,
            resolv_conf: Some(dir.join("resolv.conf")),
            ..NetConfig::default()
        };
        let handle = net::bring_up(&cfg).await;
        print_report(&handle.report());
    });
}

#[test]
fn static_ip_param_configures_address_and_route() {
    if std::env::var(ROLE).as_deref() == Ok("static") {
        // The interface is named after the parent's pid, so it comes in the environment.
        let device = std::env::var("CELLD_NET_TEST_DEVICE").unwrap();
        return static_client(Path::new(&std::env::var(DIR).unwrap()), &device);
    }
    require_root_and_tools();
    let pid = std::process::id();
    let (peer_ns, node_ns) = (format!("celld-sts-{pid}"), format!("celld-stc-{pid}"));
    let (peer_if, node_if) = (format!("sts{pid}"), format!("stc{pid}"));
    let lab = Lab::new(&[&peer_ns, &node_ns]);
    lab.veth(&peer_ns, &peer_if, "10.78.0.1/24", &node_ns, &node_if);
    let test = "static_ip_param_configures_address_and_route";
    let out = lab.run_client(
        &node_ns,
        test,
        "static",
        &[("CELLD_NET_TEST_DEVICE", &node_if)],
    );
    println!("{out}");
    let report = line(&out, "REPORT ");
    assert_eq!(
        &report[..4],
        [node_if.as_str(), "10.78.0.5", "24", "10.78.0.1"]
    );
    let addrs = run(&["ip", "-n", &node_ns, "-4", "addr", "show", "dev", &node_if]);
    assert!(addrs.contains("inet 10.78.0.5/24"), "{addrs}");
    let routes = run(&["ip", "-n", &node_ns, "route"]);
    assert!(
        routes.contains(&// `proto boot` is what `ip route` leaves unsaid.
        format!("default via 10.78.0.1 dev {node_if} metric")),
        "no default route via the ip= gateway:\n{routes}"
    );
    let resolv = std::fs::read_to_string(lab.path("resolv.conf")).unwrap();
    assert!(resolv.contains("nameserver 10.78.0.53"), "{resolv}");
    run(&[
        "ip",
        "netns",
        "exec",
        &node_ns,
        "ping",
        "-c1",
        "-W2",
        "10.78.0.1",
    ]);
}

/// Client side of the rebind test: get a lease, then wait for a different address.
fn rebind_client(dir: &Path) {
    client_runtime().block_on(async {
        let cfg = NetConfig {
            resolv_conf: Some(dir.join("resolv.conf")),
            dhcp_timeout: Duration::from_secs(20),
            ..NetConfig::default()
        };
        let handle = net::bring_up(&cfg).await;
        let first = handle.report();
        print_report(&first);
        let old = first.interfaces[0].address;
        assert!(old.is_some(), "no first lease: {first:?}");
        let mut watch = handle.watch();
        let moved = tokio::time::timeout(
            Duration::from_secs(40),
            watch.wait_for(|r| r.interfaces[0].address.is_some_and(|a| Some(a) != old)),
        )
        .await;
        assert!(
            moved.is_ok(),
            "no new lease within 40 s: {:?}",
            handle.report()
        );
        print_report(&handle.report());
        println!("MOVED");
        handle.stop();
    });
}

/// The server of the first lease vanishes: RENEW (unicast) goes unanswered until T2, the
/// REBIND broadcast reaches another server, which refuses the lease (NAK); the client
/// drops the address and discovers a new one.
#[test]
fn dhcp_rebinds_and_rediscovers_when_the_server_is_replaced() {
    if std::env::var(ROLE).as_deref() == Ok("rebind") {
        return rebind_client(Path::new(&std::env::var(DIR).unwrap()));
    }
    require_root_and_tools();
    let pid = std::process::id();
    let (srv_ns, cli_ns) = (format!("celld-rbs-{pid}"), format!("celld-rbc-{pid}"));
    let (srv_if, cli_if) = (format!("rbs{pid}"), format!("rbc{pid}"));
    let mut lab = Lab::new(&[&srv_ns, &cli_ns]);
    lab.veth(&srv_ns, &srv_if, "10.79.0.1/24", &cli_ns, &cli_if);
    let first_log = lab.path("first.log");
    let first_leases = format!("--dhcp-leasefile={}", lab.path("first.leases").display());
    let first = lab.start_dnsmasq(
        &srv_ns,
        &srv_if,
        &first_log,
        &[
            "--dhcp-range=10.79.0.50,10.79.0.60,255.255.255.0,2m",
            "--dhcp-option=option:T1,2",
            "--dhcp-option=option:T2,5",
            "--dhcp-option=option:router,10.79.0.1",
            &first_leases,
        ],
    );
    let test = "dhcp_rebinds_and_rediscovers_when_the_server_is_replaced";
    let client = lab.spawn_client(&cli_ns, test, "rebind", &[]);
    let out = wait_for_text(&client.out, "REPORT ", Duration::from_secs(25));
    let old: Ipv4Addr = line(&out, "REPORT ")[1].parse().unwrap();

    // The first server goes, with its address: unicast RENEWs to 10.79.0.1 now fall
    // into the void. The second server has another address and other leases.
    lab.stop_process(first);
    run(&["ip", "-n", &srv_ns, "addr", "flush", "dev", &srv_if]);
    run(&[
        "ip",
        "-n",
        &srv_ns,
        "addr",
        "add",
        "10.79.0.2/24",
        "dev",
        &srv_if,
    ]);
    let second_log = lab.path("second.log");
    let second_leases = format!("--dhcp-leasefile={}", lab.path("second.leases").display());
    lab.start_dnsmasq(
        &srv_ns,
        &srv_if,
        &second_log,
        &[
            "--dhcp-authoritative",
            "--dhcp-range=10.79.0.100,10.79.0.110,255.255.255.0,2m",
            "--dhcp-option=option:router,10.79.0.2",
            &second_leases,
        ],
    );
    let out = client.finish();
    println!("{out}");
    assert!(out.contains("MOVED"), "{out}");
    let reports: Vec<&str> = out.lines().filter(|l| l.starts_with("REPORT ")).collect();
    let last: Vec<&str> = reports.last().unwrap().split_whitespace().collect();
    let new: Ipv4Addr = last[2].parse().unwrap();
    assert!(
        (Ipv4Addr::new(10, 79, 0, 100)..=Ipv4Addr::new(10, 79, 0, 110)).contains(&new),
        "{new} is not from the second server"
    );
    assert_eq!(&last[3..7], ["24", "10.79.0.2", "120", "10.79.0.2"]);

    let log = std::fs::read_to_string(&second_log).unwrap();
    println!("second dnsmasq log:\n{log}");
    // The REBIND: a broadcast REQUEST for the old address, refused.
    assert!(
        log.contains(&format!("DHCPREQUEST({srv_if}) {old}")),
        "{log}"
    );
    assert!(log.contains(&format!("DHCPNAK({srv_if}) {old}")), "{log}");
    assert!(log.contains(&format!("DHCPACK({srv_if}) {new}")), "{log}");
    let addrs = run(&["ip", "-n", &cli_ns, "-4", "addr", "show", "dev", &cli_if]);
    assert!(addrs.contains(&format!("inet {new}/24")), "{addrs}");
    assert!(
        !addrs.contains(&format!("inet {old}/")),
        "old address kept:\n{addrs}"
    );
    let routes = run(&["ip", "-n", &cli_ns, "route"]);
    assert!(routes.contains("default via 10.79.0.2"), "{routes}");
    assert!(
        !routes.contains("via 10.79.0.1 "),
        "route via the old router kept:\n{routes}"
    );
}

/// Client side of the several-NICs test: short deadlines, print what came of each.
fn several_client() {
    client_runtime().block_on(async {
        let cfg = NetConfig {
            resolv_conf: None,
            carrier_timeout: Duration::from_secs(1),
            dhcp_timeout: Duration::from_secs(3),
            ..NetConfig::default()
        };
        let started = Instant::now();
        let handle = net::bring_up(&cfg).await;
        println!("RETURNED_MS {}", started.elapsed().as_millis());
        for i in handle.report().interfaces {
            println!(
                "IFACE {} {}",
                i.name,
                i.address.map_or("-".into(), |a| a.to_string())
            );
            println!("ERROR {} {}", i.name, i.error.unwrap_or_default());
        }
        handle.stop();
    });
}

/// One NIC with a DHCP server, one with carrier but no server, one without carrier:
/// `bring_up` configures the first, reports the others, and returns within its deadline.
#[test]
fn dhcp_on_several_nics_reports_the_dead_ones_and_returns() {
    if std::env::var(ROLE).as_deref() == Ok("several") {
        return several_client();
    }
    require_root_and_tools();
    let pid = std::process::id();
    let (srv_ns, cli_ns) = (format!("celld-svs-{pid}"), format!("celld-svc-{pid}"));
    let (served, silent, unplugged) = (
        format!("sva{pid}"),
        format!("svb{pid}"),
        format!("svc{pid}"),
    );
    let mut lab = Lab::new(&[&srv_ns, &cli_ns]);
    lab.veth(
        &srv_ns,
        &format!("pa{pid}"),
        "10.80.0.1/24",
        &cli_ns,
        &served,
    );
    lab.veth(
        &srv_ns,
        &format!("pb{pid}"),
        "10.81.0.1/24",
        &cli_ns,
        &silent,
    );
    lab.veth(
        &srv_ns,
        &format!("pc{pid}"),
        "10.82.0.1/24",
        &cli_ns,
        &unplugged,
    );
    run(&[
        "ip",
        "-n",
        &srv_ns,
        "link",
        "set",
        &format!("pc{pid}"),
        "down",
    ]);
    let log = lab.path("dnsmasq.log");
    let leases = format!("--dhcp-leasefile={}", lab.path("leases").display());
    lab.start_dnsmasq(
        &srv_ns,
        &format!("pa{pid}"),
        &log,
        &[
            "--dhcp-range=10.80.0.50,10.80.0.60,255.255.255.0,2m",
            "--dhcp-option=option:router,10.80.0.1",
            &leases,
        ],
    );
    let test = "dhcp_on_several_nics_reports_the_dead_ones_and_returns";
    let out = lab.run_client(&cli_ns, test, "several", &[]);
    println!("{out}");
    let returned: u64 = line(&out, "RETURNED_MS ")[0].parse().unwrap();
    // carrier_timeout + dhcp_timeout + 1 s of slack, and a little for a loaded machine.
    assert!(returned < 6_000, "bring_up took {returned} ms");
    let address = line(&out, &format!("IFACE {served} "))[0];
    assert!(address.starts_with("10.80.0."), "{out}");
    assert_eq!(line(&out, &format!("IFACE {silent} ")), ["-"]);
    assert_eq!(line(&out, &format!("IFACE {unplugged} ")), ["-"]);
    let silent_error = line(&out, &format!("ERROR {silent} ")).join(" ");
    assert!(silent_error.contains("no DHCP OFFER"), "{silent_error}");
    let unplugged_error = line(&out, &format!("ERROR {unplugged} ")).join(" ");
    assert!(unplugged_error.contains("no carrier"), "{unplugged_error}");
    let routes = run(&["ip", "-n", &cli_ns, "route"]);
    assert!(
        routes.contains(&format!("default via 10.80.0.1 dev {served}")),
        "{routes}"
    );
}

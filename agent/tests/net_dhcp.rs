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
        let timeout = Duration::from_secs(60);
        let out_path = self.path(&format!("{role}.out"));
        let out = std::fs::File::create(&out_path).unwrap();
        let exe = std::env::current_exe().unwrap();
        let mut child = Command::new("ip")
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
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break Some(s);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let text = std::fs::read_to_string(&out_path).unwrap();
        match status {
            Some(s) if s.success() => text,
            Some(s) => panic!("client in {ns} failed ({s}):\n{text}"),
            None => panic!("client in {ns} did not finish in {timeout:?}:\n{text}"),
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

/// The line `key ...` the client printed, split into words.
fn line<'a>(out: &'a str, key: &str) -> Vec<&'a str> {
    out.lines()
        .find_map(|l| l.strip_prefix(key))
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
    let dnsmasq = Command::new("ip")
        .args([
            "netns",
            "exec",
            &srv_ns,
            "dnsmasq",
            "--no-daemon",
            "--conf-file=/dev/null",
        ])
        .arg(format!("--interface={srv_if}"))
        .args([
            "--bind-interfaces",
            "--port=0",
            "--log-dhcp",
            "--log-facility=-",
        ])
        // dnsmasq otherwise holds the first OFFER ~3 s for an ICMP probe of the address;
        // the time to address printed below should be the client's.
        .arg("--no-ping")
        // dnsmasq's shortest lease is 2 minutes; T1/T2 make the client renew in seconds.
        .args(["--dhcp-range=10.77.0.50,10.77.0.60,255.255.255.0,2m"])
        .args(["--dhcp-option=option:T1,4", "--dhcp-option=option:T2,8"])
        .args(["--dhcp-option=option:router,10.77.0.1"])
        .args(["--dhcp-option=option:dns-server,10.77.0.53"])
        .arg(format!("--dhcp-leasefile={}", lab.path("leases").display()))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .expect("start dnsmasq");
    lab.processes.push(dnsmasq);
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let ready = Instant::now() + Duration::from_secs(5);
    while !log().contains("DHCP, IP range") {
        assert!(Instant::now() < ready, "dnsmasq did not start:\n{}", log());
        std::thread::sleep(Duration::from_millis(50));
    }

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

//! Bringing the node's network up when celld is PID 1: every Ethernet interface is set
//! up, and then configured either statically (kernel `ip=` or node config) or by a DHCPv4
//! client that keeps renewing its lease for as long as celld runs.
//!
//! This room configures interfaces and reports what it did; it must not decide policy
//! (which config wins is the caller's, see [`NetConfig::param`]), never panics and never
//! blocks past its deadlines: an interface without carrier or without a DHCP server is
//! reported with an error and keeps being tried in the background.
//!
//! # Layout
//!
//! - [`ip_param`]: the kernel's `ip=` syntax (pure).
//! - [`dhcp_packet`]: DHCP messages to bytes and back (pure).
//! - [`dhcp_client`]: the DHCP conversation on one interface.
//! - [`rtnetlink`]: addresses and routes, over rtnetlink (why not ioctls: see there).
//! - [`link`]: which interfaces exist, carrier.
//! - [`lease`]: one interface's life: carrier, lease, apply, renew, report.

pub mod dhcp_client;
pub mod dhcp_packet;
pub mod ip_param;
pub mod lease;
pub mod link;
pub mod rtnetlink;

use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use ip_param::{IpParam, IpParamError, StaticIp, parse_ip_param, parse_ip_value};

/// How to bring the network up.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// What to do; from `ip=` or node config. The default is DHCP on every interface.
    pub param: IpParam,
    /// Where interfaces are listed; tests point it elsewhere.
    pub sys_class_net: PathBuf,
    /// How long to wait for carrier before reporting an interface as unplugged.
    pub carrier_timeout: Duration,
    /// How long the first DHCP attempt may take before `bring_up` returns without it.
    pub dhcp_timeout: Duration,
    /// Sent to the DHCP server (option 12) so it can register the name.
    pub hostname: Option<String>,
    /// Written from the DNS servers of the lease or `ip=`; None: leave it alone.
    pub resolv_conf: Option<PathBuf>,
}

impl Default for NetConfig {
    fn default() -> Self {
        Self {
            param: IpParam::Dhcp {
                device: None,
                hostname: None,
                requested: None,
            },
            sys_class_net: "/sys/class/net".into(),
            carrier_timeout: Duration::from_secs(5),
            dhcp_timeout: Duration::from_secs(30),
            hostname: None,
            resolv_conf: Some("/etc/resolv.conf".into()),
        }
    }
}

/// Where an interface's configuration came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Source {
    #[default]
    None,
    Static,
    Dhcp,
}

/// One interface, as status and the console show it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InterfaceReport {
    pub name: String,
    pub mac: String,
    pub source: Source,
    pub address: Option<Ipv4Addr>,
    pub prefix_len: u8,
    pub gateway: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    /// Lease length as granted; None for static or no lease.
    pub lease_secs: Option<u32>,
    /// DHCP server of the lease.
    pub server: Option<Ipv4Addr>,
    /// How many times the lease was extended.
    pub renewals: u32,
    /// From `bring_up` to the address being configured, the first time.
    pub time_to_address: Option<Duration>,
    /// The last thing that went wrong; cleared when the interface gets configured.
    pub error: Option<String>,
    /// True once the first attempt ended, in success or failure.
    pub settled: bool,
}

impl fmt::Display for InterfaceReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.name, self.mac)?;
        if let Some(a) = self.address {
            write!(f, " {a}/{}", self.prefix_len)?;
        }
        if let Some(g) = self.gateway {
            write!(f, " via {g}")?;
        }
        if let (Some(l), Some(s)) = (self.lease_secs, self.server) {
            write!(f, " (DHCP lease {l} s from {s})")?;
        } else if self.source == Source::Static {
            write!(f, " (static)")?;
        }
        if let Some(e) = &self.error {
            write!(f, ": {e}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NetReport {
    pub interfaces: Vec<InterfaceReport>,
    /// A problem not tied to one interface (no /sys/class/net, named device missing).
    pub error: Option<String>,
}

/// The running network configuration: the report, kept current by the lease tasks.
/// Dropping it leaves the tasks running (PID 1 keeps its leases); `stop` ends them.
pub struct NetHandle {
    report: watch::Receiver<NetReport>,
    tasks: Vec<JoinHandle<()>>,
}

impl NetHandle {
    pub fn report(&self) -> NetReport {
        self.report.borrow().clone()
    }

    /// Changes as leases come, renew and go.
    pub fn watch(&self) -> watch::Receiver<NetReport> {
        self.report.clone()
    }

    /// Stops renewing. Addresses stay configured until their owner removes them.
    pub fn stop(self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Brings every Ethernet interface up and configures it as `cfg` says. Returns when each
/// interface has an address or its first attempt has failed, at the latest after
/// `carrier_timeout + dhcp_timeout` (plus a second of slack); leases are renewed by tasks
/// on the current tokio runtime.
pub async fn bring_up(cfg: &NetConfig) -> NetHandle {
    let started = tokio::time::Instant::now();
    let (tx, rx) = watch::channel(NetReport::default());
    let tx = Arc::new(tx);
    let interfaces = match link::list_interfaces(&cfg.sys_class_net) {
        Ok(l) => l,
        Err(e) => {
            let error = format!(
                "cannot list interfaces in {}: {e}",
                cfg.sys_class_net.display()
            );
            tracing::error!(error, "network not configured");
            tx.send_replace(NetReport {
                interfaces: Vec::new(),
                error: Some(error),
            });
            return NetHandle {
                report: rx,
                tasks: Vec::new(),
            };
        }
    };
    if interfaces.is_empty() && !matches!(cfg.param, IpParam::Off) {
        let error = format!(
            "no Ethernet interface in {}: is the NIC driver in the kernel?",
            cfg.sys_class_net.display()
        );
        tracing::error!(error, "network not configured");
        tx.send_modify(|r| r.error = Some(error));
    }
    tx.send_modify(|r| {
        r.interfaces = interfaces
            .iter()
            .map(|i| InterfaceReport {
                name: i.name.clone(),
                mac: i.mac_string(),
                settled: matches!(cfg.param, IpParam::Off),
                ..Default::default()
            })
            .collect();
    });
    let tasks = lease::start(cfg, &interfaces, started, &tx).await;
    let mut watching = rx.clone();
    let deadline = cfg.carrier_timeout + cfg.dhcp_timeout + Duration::from_secs(1);
    let all_settled = |r: &NetReport| r.interfaces.iter().all(|i| i.settled);
    if tokio::time::timeout(deadline, watching.wait_for(all_settled))
        .await
        .is_err()
    {
        tracing::warn!(
            "network bring-up deadline passed; leases keep being tried in the background"
        );
    }
    for i in &rx.borrow().interfaces {
        tracing::info!(iface = %i.name, mac = %i.mac, address = ?i.address, prefix_len = i.prefix_len, gateway = ?i.gateway, lease_secs = ?i.lease_secs, server = ?i.server, error = ?i.error, "network interface");
    }
    NetHandle { report: rx, tasks }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake /sys/class/net: bring_up must decide these cases without touching the kernel.
    fn fake_sys(names: &[&str]) -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        for (i, name) in names.iter().enumerate() {
            let d = t.path().join(name);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("type"), "1\n").unwrap();
            std::fs::write(d.join("ifindex"), format!("{}\n", i + 2)).unwrap();
            std::fs::write(d.join("address"), format!("52:54:00:00:00:0{i}\n")).unwrap();
        }
        t
    }

    fn cfg(sys: &std::path::Path, param: &str) -> NetConfig {
        NetConfig {
            param: parse_ip_value(param).unwrap(),
            sys_class_net: sys.to_path_buf(),
            resolv_conf: None,
            ..NetConfig::default()
        }
    }

    #[tokio::test]
    async fn off_lists_interfaces_and_configures_nothing() {
        let sys = fake_sys(&["eth1", "eth0"]);
        let r = bring_up(&cfg(sys.path(), "off")).await.report();
        let names: Vec<_> = r.interfaces.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["eth0", "eth1"]);
        assert_eq!(r.interfaces[0].mac, "52:54:00:00:00:01");
        assert!(
            r.interfaces
                .iter()
                .all(|i| i.address.is_none() && i.error.is_none())
        );
        assert_eq!(r.error, None);
    }

    #[tokio::test]
    async fn a_device_that_does_not_exist_is_named_in_the_error() {
        let sys = fake_sys(&["eth0"]);
        for param in ["10.0.0.5:::255.255.255.0::eth9:off", ":::::eth9:dhcp"] {
            let started = std::time::Instant::now();
            let r = bring_up(&cfg(sys.path(), param)).await.report();
            let e = r.error.unwrap();
            assert!(e.contains("\"eth9\"") && e.contains("have: eth0"), "{e}");
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "waited for nothing"
            );
        }
    }

    #[tokio::test]
    async fn missing_sysfs_or_no_nic_is_an_error_not_a_hang() {
        let sys = fake_sys(&[]);
        let r = bring_up(&cfg(&sys.path().join("nope"), "dhcp"))
            .await
            .report();
        assert!(r.error.unwrap().contains("cannot list interfaces"));
        let r = bring_up(&cfg(sys.path(), "dhcp")).await.report();
        assert!(r.error.unwrap().contains("no Ethernet interface"));
    }

    #[test]
    fn console_line_says_what_the_interface_has() {
        let mut i = InterfaceReport {
            name: "eth0".into(),
            mac: "52:54:00:00:00:01".into(),
            source: Source::Dhcp,
            address: Some(Ipv4Addr::new(10, 0, 0, 5)),
            prefix_len: 24,
            gateway: Some(Ipv4Addr::new(10, 0, 0, 1)),
            lease_secs: Some(3600),
            server: Some(Ipv4Addr::new(10, 0, 0, 1)),
            ..Default::default()
        };
        assert_eq!(
            i.to_string(),
            "eth0 52:54:00:00:00:01 10.0.0.5/24 via 10.0.0.1 (DHCP lease 3600 s from 10.0.0.1)"
        );
        i = InterfaceReport {
            name: "eth1".into(),
            mac: "52:54:00:00:00:02".into(),
            error: Some("no carrier after 5 s".into()),
            ..Default::default()
        };
        assert_eq!(
            i.to_string(),
            "eth1 52:54:00:00:00:02: no carrier after 5 s"
        );
    }
}

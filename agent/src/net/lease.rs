//! One interface's life: link up, carrier, then a static address or a DHCP lease that is
//! applied, renewed, and removed when it expires; every step lands in the report.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::dhcp_client::DhcpClient;
use super::dhcp_packet::LeaseOffer;
use super::link::{self, Interface};
use super::rtnetlink::{self, NetlinkError, RTPROT_BOOT, RTPROT_DHCP};
use super::{InterfaceReport, IpParam, NetConfig, NetReport, Source, StaticIp};

/// Default routes get 100 + ifindex, so several NICs each keep one and the first wins.
const ROUTE_METRIC_BASE: u32 = 100;
/// After a failed DHCP round: wait this long, doubling up to MAX_BACKOFF.
const FIRST_BACKOFF: Duration = Duration::from_secs(2);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Later DHCP rounds (after the first, which `dhcp_timeout` bounds) last this long.
const ROUND: Duration = Duration::from_secs(60);

/// Writes into one interface's entry of the shared report.
#[derive(Clone)]
struct Reporter {
    tx: Arc<watch::Sender<NetReport>>,
    index: usize,
}

impl Reporter {
    fn update(&self, f: impl FnOnce(&mut InterfaceReport)) {
        self.tx.send_modify(|r| {
            if let Some(i) = r.interfaces.get_mut(self.index) {
                f(i);
            }
        });
    }

    fn fail(&self, error: String) {
        let iface = self
            .tx
            .borrow()
            .interfaces
            .get(self.index)
            .map(|i| i.name.clone());
        tracing::warn!(
            iface = iface.unwrap_or_default(),
            error,
            "network interface"
        );
        self.update(|r| {
            r.error = Some(error);
            r.settled = true;
        });
    }
}

/// What the DHCP tasks share.
struct DhcpSettings {
    sys_class_net: PathBuf,
    carrier_timeout: Duration,
    dhcp_timeout: Duration,
    hostname: Option<String>,
    requested: Option<Ipv4Addr>,
    resolv_conf: Option<PathBuf>,
    started: Instant,
}

/// Starts configuring `interfaces` as `cfg.param` says. Static configuration is done
/// before this returns; DHCP runs in the returned tasks.
pub(super) async fn start(
    cfg: &NetConfig,
    interfaces: &[Interface],
    started: Instant,
    tx: &Arc<watch::Sender<NetReport>>,
) -> Vec<JoinHandle<()>> {
    let reporter = |index| Reporter {
        tx: tx.clone(),
        index,
    };
    let named = |device: &Option<String>| -> Result<Option<usize>, String> {
        let Some(d) = device else { return Ok(None) };
        match interfaces.iter().position(|i| &i.name == d) {
            Some(i) => Ok(Some(i)),
            None => Err(format!(
                "interface {d:?} named by ip= does not exist (have: {})",
                interfaces
                    .iter()
                    .map(|i| i.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    };
    let settle_all = |error: String| {
        tracing::error!(error, "network not configured");
        tx.send_modify(|r| {
            r.error = Some(error);
            r.interfaces.iter_mut().for_each(|i| i.settled = true);
        });
    };
    match &cfg.param {
        IpParam::Off => Vec::new(),
        IpParam::Static(s) => {
            match named(&s.device) {
                Ok(target) => configure_static(cfg, interfaces, target, s, started, reporter).await,
                Err(e) => settle_all(e),
            }
            Vec::new()
        }
        IpParam::Dhcp {
            device,
            hostname,
            requested,
        } => {
            let only = match named(device) {
                Ok(only) => only,
                Err(e) => {
                    settle_all(e);
                    return Vec::new();
                }
            };
            let settings = Arc::new(DhcpSettings {
                sys_class_net: cfg.sys_class_net.clone(),
                carrier_timeout: cfg.carrier_timeout,
                dhcp_timeout: cfg.dhcp_timeout,
                hostname: hostname.clone().or_else(|| cfg.hostname.clone()),
                requested: *requested,
                resolv_conf: cfg.resolv_conf.clone(),
                started,
            });
            let mut tasks = Vec::new();
            for (index, iface) in interfaces.iter().enumerate() {
                if only.is_some_and(|o| o != index) {
                    reporter(index).update(|r| r.settled = true);
                    continue;
                }
                let task = run_dhcp(iface.clone(), settings.clone(), reporter(index));
                tasks.push(tokio::spawn(task));
            }
            tasks
        }
    }
}

/// Static `ip=`: the named interface, else the first with carrier, else the first.
async fn configure_static(
    cfg: &NetConfig,
    interfaces: &[Interface],
    target: Option<usize>,
    s: &StaticIp,
    started: Instant,
    reporter: impl Fn(usize) -> Reporter,
) {
    for (index, iface) in interfaces.iter().enumerate() {
        if let Err(e) = rtnetlink::link_up(&iface.name, iface.ifindex) {
            reporter(index).fail(e.to_string());
        }
    }
    let deadline = Instant::now() + cfg.carrier_timeout;
    let carrier = |i: &Interface| link::has_carrier(&cfg.sys_class_net, &i.name);
    let target = loop {
        let found = match target {
            Some(t) => carrier(&interfaces[t]).then_some(t),
            None => interfaces.iter().position(carrier),
        };
        if let Some(t) = found {
            break Some(t);
        }
        if Instant::now() >= deadline {
            break target.or((!interfaces.is_empty()).then_some(0));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for index in 0..interfaces.len() {
        reporter(index).update(|r| r.settled = true);
    }
    let Some(index) = target else { return };
    let iface = &interfaces[index];
    let has_carrier = carrier(iface);
    let result = rtnetlink::add_address(&iface.name, iface.ifindex, s.address, s.prefix_len)
        .and_then(|()| match s.gateway {
            Some(gw) => rtnetlink::set_default_route(
                &iface.name,
                iface.ifindex,
                s.address,
                s.prefix_len,
                gw,
                ROUTE_METRIC_BASE + iface.ifindex,
                RTPROT_BOOT,
            ),
            None => Ok(()),
        });
    if !s.dns.is_empty() {
        write_resolv_conf(cfg.resolv_conf.as_deref(), &iface.name, "ip=", &s.dns);
    }
    let error = match (&result, has_carrier) {
        (Err(e), _) => Some(e.to_string()),
        (Ok(()), false) => Some(format!(
            "configured, but no carrier after {:?}",
            cfg.carrier_timeout
        )),
        (Ok(()), true) => None,
    };
    reporter(index).update(|r| {
        r.source = Source::Static;
        if result.is_ok() {
            r.address = Some(s.address);
            r.prefix_len = s.prefix_len;
            r.gateway = s.gateway;
            r.dns = s.dns.clone();
            r.time_to_address = Some(started.elapsed());
        }
        r.error = error;
    });
}

/// DHCP on one interface, for as long as the task lives: never returns on its own.
async fn run_dhcp(iface: Interface, set: Arc<DhcpSettings>, report: Reporter) {
    if let Err(e) = rtnetlink::link_up(&iface.name, iface.ifindex) {
        // Without IFF_UP nothing below can work; carrier never comes.
        report.fail(e.to_string());
    }
    if !link::wait_for_carrier(&set.sys_class_net, &iface.name, set.carrier_timeout).await {
        report.fail(format!(
            "no carrier after {} s (cable unplugged?); still waiting",
            set.carrier_timeout.as_secs()
        ));
        while !link::has_carrier(&set.sys_class_net, &iface.name) {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    let mut client = loop {
        match DhcpClient::open(&iface, set.hostname.clone()) {
            Ok(c) => break c,
            Err(e) => {
                report.fail(e.to_string());
                tokio::time::sleep(MAX_BACKOFF).await;
            }
        }
    };
    let mut first_round = Some(Instant::now() + set.dhcp_timeout);
    let mut backoff = FIRST_BACKOFF;
    loop {
        let deadline = first_round.take().unwrap_or_else(|| Instant::now() + ROUND);
        let lease = match client.acquire(set.requested, deadline).await {
            Ok(l) => l,
            Err(e) => {
                report.fail(format!("{e}; retrying in {} s", backoff.as_secs()));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        if let Err(e) = apply_lease(&iface, None, &lease, &set) {
            report.fail(format!("{e}; retrying in {} s", backoff.as_secs()));
            tokio::time::sleep(backoff).await;
            continue;
        }
        backoff = FIRST_BACKOFF;
        let started = set.started;
        report.update(|r| {
            record_lease(r, &lease);
            r.time_to_address.get_or_insert_with(|| started.elapsed());
        });
        let mut current = lease;
        let mut bound_at = Instant::now();
        loop {
            match client.extend(&current, bound_at).await {
                Ok(new) => {
                    bound_at = Instant::now();
                    if let Err(e) = apply_lease(&iface, Some(&current), &new, &set) {
                        report.update(|r| r.error = Some(e.to_string()));
                    } else {
                        report.update(|r| {
                            record_lease(r, &new);
                            r.renewals += 1;
                        });
                    }
                    tracing::info!(iface = %iface.name, address = %new.address, lease_secs = new.lease_secs, "DHCP lease extended");
                    current = new;
                }
                Err(e) => {
                    // Expired or refused: the address is no longer ours to use.
                    if let Err(del) = rtnetlink::del_address(
                        &iface.name,
                        iface.ifindex,
                        current.address,
                        current.prefix_len,
                    ) {
                        tracing::warn!(iface = %iface.name, error = %del, "removing lost DHCP address");
                    }
                    report.update(|r| {
                        r.address = None;
                        r.gateway = None;
                        r.lease_secs = None;
                        r.error = Some(format!("{e}; lease lost, discovering again"));
                    });
                    tracing::warn!(iface = %iface.name, error = %e, "DHCP lease lost");
                    break;
                }
            }
        }
    }
}

fn record_lease(r: &mut InterfaceReport, l: &LeaseOffer) {
    r.source = Source::Dhcp;
    r.address = Some(l.address);
    r.prefix_len = l.prefix_len;
    r.gateway = l.routers.first().copied();
    r.dns = l.dns.clone();
    r.lease_secs = Some(l.lease_secs);
    r.server = Some(l.server);
    r.error = None;
    r.settled = true;
}

fn apply_lease(
    iface: &Interface,
    old: Option<&LeaseOffer>,
    new: &LeaseOffer,
    set: &DhcpSettings,
) -> Result<(), NetlinkError> {
    if let Some(old) = old.filter(|o| (o.address, o.prefix_len) != (new.address, new.prefix_len)) {
        // The routes through the old address go with it.
        let _ = rtnetlink::del_address(&iface.name, iface.ifindex, old.address, old.prefix_len);
    }
    rtnetlink::add_address(&iface.name, iface.ifindex, new.address, new.prefix_len)?;
    if let Some(&gw) = new.routers.first() {
        rtnetlink::set_default_route(
            &iface.name,
            iface.ifindex,
            new.address,
            new.prefix_len,
            gw,
            ROUTE_METRIC_BASE + iface.ifindex,
            RTPROT_DHCP,
        )?;
    }
    if !new.dns.is_empty() && old.is_none_or(|o| o.dns != new.dns) {
        write_resolv_conf(set.resolv_conf.as_deref(), &iface.name, "DHCP", &new.dns);
    }
    Ok(())
}

/// Best effort: /etc may be read-only in the image, and DNS is not needed to be a node.
fn write_resolv_conf(path: Option<&Path>, iface: &str, from: &str, dns: &[Ipv4Addr]) {
    let Some(path) = path else { return };
    let mut text = format!("# written by celld from {from} on {iface}\n");
    for d in dns {
        text.push_str(&format!("nameserver {d}\n"));
    }
    if let Err(e) = std::fs::write(path, text) {
        tracing::warn!(path = %path.display(), error = %e, "cannot write resolv.conf");
    }
}

//! The DHCPv4 client conversation on one interface (RFC 2131 section 4.4): INIT ->
//! SELECTING -> REQUESTING -> BOUND, then RENEWING (unicast to the server at T1) and
//! REBINDING (broadcast at T2) until the lease is extended or expires.
//!
//! It talks over an ordinary UDP socket bound to port 68 and to the device
//! (SO_BINDTODEVICE), with SO_BROADCAST. That works before the interface has an address
//! because the broadcast flag makes servers answer to 255.255.255.255, which the kernel
//! delivers to the bound socket. It does not configure anything: the caller applies
//! leases. Timing decisions are pure functions, unit tested.

use std::hash::{BuildHasher, Hasher};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::time::Duration;

use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, SockaddrIn, bind, setsockopt, socket, sockopt,
};
use tokio::net::UdpSocket;
use tokio::time::Instant;

use super::dhcp_packet::{
    DhcpPacket, LeaseOffer, MessageType, OP_REPLY, OPT_HOSTNAME, OPT_REQUESTED_IP, OPT_SERVER_ID,
};
use super::link::Interface;

const SERVER_PORT: u16 = 67;
const CLIENT_PORT: u16 = 68;
/// First retransmission wait; doubles up to MAX_RETRANSMIT (RFC 2131 4.1 says 4 s, but a
/// booting node on a quiet LAN should not wait that long for a lost first DISCOVER).
const FIRST_RETRANSMIT: Duration = Duration::from_secs(1);
const MAX_RETRANSMIT: Duration = Duration::from_secs(16);

#[derive(Debug, thiserror::Error)]
pub enum DhcpError {
    #[error("DHCP socket on {iface}: {source}")]
    Socket {
        iface: String,
        source: std::io::Error,
    },
    #[error("no DHCP {waiting_for} on {iface} after {tries} tries in {secs} s")]
    Timeout {
        iface: String,
        waiting_for: &'static str,
        tries: u32,
        secs: u64,
    },
    #[error("DHCP server {server} refused the lease (NAK) on {iface}")]
    Nak { iface: String, server: Ipv4Addr },
}

/// When to renew, rebind and give up, counted from the moment the ACK arrived.
/// `None` everywhere means an infinite lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTimes {
    pub renew: Option<Duration>,
    pub rebind: Option<Duration>,
    pub expiry: Option<Duration>,
}

/// T1 = lease/2 and T2 = 7/8 lease unless the server says otherwise (options 58, 59);
/// server values that are out of order are ignored, as RFC 2131 4.4.5 allows.
pub fn lease_times(offer: &LeaseOffer) -> LeaseTimes {
    if offer.lease_secs == u32::MAX {
        return LeaseTimes {
            renew: None,
            rebind: None,
            expiry: None,
        };
    }
    let lease = u64::from(offer.lease_secs.max(1)) * 1000;
    let mut t1 = offer
        .renew_secs
        .map(|s| u64::from(s) * 1000)
        .unwrap_or(lease / 2);
    let mut t2 = offer
        .rebind_secs
        .map(|s| u64::from(s) * 1000)
        .unwrap_or(lease * 7 / 8);
    if t2 >= lease || t2 == 0 {
        t2 = lease * 7 / 8;
    }
    if t1 >= t2 || t1 == 0 {
        t1 = t2.min(lease / 2);
    }
    LeaseTimes {
        renew: Some(Duration::from_millis(t1)),
        rebind: Some(Duration::from_millis(t2)),
        expiry: Some(Duration::from_millis(lease)),
    }
}

/// Retransmission wait for try `n` (0-based): 1, 2, 4, 8, 16, 16 ... s plus up to half a
/// second of jitter so a rack of nodes booting together does not retry in lock step.
pub fn retransmit_wait(n: u32, jitter: u64) -> Duration {
    let base = FIRST_RETRANSMIT
        .saturating_mul(1u32.checked_shl(n).unwrap_or(u32::MAX))
        .min(MAX_RETRANSMIT);
    base + Duration::from_millis(jitter % 500)
}

/// While renewing or rebinding: wait half the time left before the next stage (RFC 2131
/// 4.4.5), at least a second (or what is left), at most a minute.
pub fn extend_wait(left: Duration) -> Duration {
    (left / 2).clamp(Duration::from_secs(1).min(left), Duration::from_secs(60))
}

/// A random number without a crate: std seeds every RandomState from the OS.
pub fn random_u64() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    h.finish()
}

pub struct DhcpClient {
    iface: Interface,
    sock: UdpSocket,
    hostname: Option<String>,
    started: Instant,
}

impl DhcpClient {
    /// Opens port 68 on `iface` only; several interfaces each get their own socket.
    pub fn open(iface: &Interface, hostname: Option<String>) -> Result<Self, DhcpError> {
        let io = |e: nix::errno::Errno| DhcpError::Socket {
            iface: iface.name.clone(),
            source: e.into(),
        };
        let fd = socket(
            AddressFamily::Inet,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .map_err(io)?;
        setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(io)?;
        setsockopt(&fd, sockopt::Broadcast, &true).map_err(io)?;
        setsockopt(&fd, sockopt::BindToDevice, &iface.name.clone().into()).map_err(io)?;
        bind(fd.as_raw_fd(), &SockaddrIn::new(0, 0, 0, 0, CLIENT_PORT)).map_err(io)?;
        let sock =
            UdpSocket::from_std(std::net::UdpSocket::from(fd)).map_err(|e| DhcpError::Socket {
                iface: iface.name.clone(),
                source: e,
            })?;
        Ok(Self {
            iface: iface.clone(),
            sock,
            hostname,
            started: Instant::now(),
        })
    }

    fn message(&self, kind: MessageType, xid: u32) -> DhcpPacket {
        let mut p = DhcpPacket::client(kind, xid, self.iface.mac);
        p.secs = self.started.elapsed().as_secs().min(u64::from(u16::MAX)) as u16;
        if let Some(h) = &self.hostname {
            p.set_text_option(OPT_HOSTNAME, h);
        }
        p
    }

    /// DISCOVER, take the first OFFER, REQUEST it, wait for the ACK; until `deadline`.
    /// A NAK to the REQUEST starts over with a new DISCOVER.
    pub async fn acquire(
        &mut self,
        requested: Option<Ipv4Addr>,
        deadline: Instant,
    ) -> Result<LeaseOffer, DhcpError> {
        self.started = Instant::now();
        loop {
            let xid = random_u64() as u32;
            let mut discover = self.message(MessageType::Discover, xid);
            if let Some(ip) = requested {
                discover.set_ip_option(OPT_REQUESTED_IP, ip);
            }
            let broadcast = SocketAddrV4::new(Ipv4Addr::BROADCAST, SERVER_PORT);
            let offer = self
                .exchange(
                    &discover,
                    broadcast,
                    &[MessageType::Offer],
                    None,
                    deadline,
                    "OFFER",
                )
                .await?;
            let mut request = self.message(MessageType::Request, xid);
            request.set_ip_option(OPT_REQUESTED_IP, offer.address);
            request.set_ip_option(OPT_SERVER_ID, offer.server);
            let kinds = [MessageType::Ack, MessageType::Nak];
            let reply = self
                .exchange(
                    &request,
                    broadcast,
                    &kinds,
                    Some(offer.server),
                    deadline,
                    "ACK",
                )
                .await?;
            if reply.kind == MessageType::Ack {
                return Ok(reply);
            }
            tracing::warn!(iface = %self.iface.name, server = %reply.server, "DHCP NAK while requesting an offer; discovering again");
            // A server that NAKs its own offers would otherwise be hammered in a loop.
            tokio::time::sleep(
                Duration::from_secs(1).min(deadline.saturating_duration_since(Instant::now())),
            )
            .await;
        }
    }

    /// Extends `lease` (acquired at `bound_at`): REQUEST unicast to its server until T2,
    /// then broadcast until expiry. Err(Timeout) means the lease has expired.
    pub async fn extend(
        &mut self,
        lease: &LeaseOffer,
        bound_at: Instant,
    ) -> Result<LeaseOffer, DhcpError> {
        let times = lease_times(lease);
        let (Some(t1), Some(t2), Some(expiry)) = (times.renew, times.rebind, times.expiry) else {
            return std::future::pending().await; // infinite lease: nothing to do, ever
        };
        tokio::time::sleep_until(bound_at + t1).await;
        self.started = Instant::now();
        let xid = random_u64() as u32;
        let mut request = self.message(MessageType::Request, xid);
        request.ciaddr = lease.address;
        // We have an address now: the server may answer us directly.
        request.broadcast = false;
        let kinds = [MessageType::Ack, MessageType::Nak];
        let unicast = SocketAddrV4::new(lease.server, SERVER_PORT);
        let renewed = self
            .exchange(
                &request,
                unicast,
                &kinds,
                None,
                bound_at + t2,
                "ACK to RENEW",
            )
            .await;
        let reply = match renewed {
            Ok(r) => r,
            Err(DhcpError::Timeout { .. }) => {
                tracing::warn!(iface = %self.iface.name, server = %lease.server, "DHCP server did not answer RENEW; rebinding");
                let broadcast = SocketAddrV4::new(Ipv4Addr::BROADCAST, SERVER_PORT);
                self.exchange(
                    &request,
                    broadcast,
                    &kinds,
                    None,
                    bound_at + expiry,
                    "ACK to REBIND",
                )
                .await?
            }
            Err(e) => return Err(e),
        };
        match reply.kind {
            MessageType::Ack if reply.address == lease.address => Ok(reply),
            MessageType::Ack => {
                // A server that hands out a different address while renewing: take it, the
                // caller replaces the address.
                tracing::warn!(iface = %self.iface.name, old = %lease.address, new = %reply.address, "DHCP renewal changed the address");
                Ok(reply)
            }
            _ => Err(DhcpError::Nak {
                iface: self.iface.name.clone(),
                server: reply.server,
            }),
        }
    }

    /// Sends `msg` to `dest` and retransmits until a reply of one of `kinds` (from
    /// `server`, if given) arrives or `deadline` passes. Stray and malformed packets are
    /// logged and skipped.
    async fn exchange(
        &mut self,
        msg: &DhcpPacket,
        dest: SocketAddrV4,
        kinds: &[MessageType],
        server: Option<Ipv4Addr>,
        deadline: Instant,
        waiting_for: &'static str,
    ) -> Result<LeaseOffer, DhcpError> {
        let start = Instant::now();
        let renewing = !msg.ciaddr.is_unspecified();
        let mut tries = 0;
        let mut buf = vec![0u8; 1500];
        while Instant::now() < deadline {
            let mut out = msg.clone();
            out.secs = self.started.elapsed().as_secs().min(u64::from(u16::MAX)) as u16;
            if let Err(e) = self.sock.send_to(&out.encode(), dest).await {
                // ENETUNREACH and friends pass (the link may be flapping): retry later.
                tracing::warn!(iface = %self.iface.name, %dest, error = %e, "DHCP send failed");
            }
            tries += 1;
            let wait = if renewing {
                extend_wait(deadline.saturating_duration_since(Instant::now()))
            } else {
                retransmit_wait(tries - 1, random_u64())
            };
            let until = (Instant::now() + wait).min(deadline);
            while let Ok(got) = tokio::time::timeout_at(until, self.sock.recv_from(&mut buf)).await
            {
                let n = match got {
                    Ok((n, _)) => n,
                    Err(e) => {
                        tracing::warn!(iface = %self.iface.name, error = %e, "DHCP receive failed");
                        tokio::time::sleep_until(until).await;
                        break;
                    }
                };
                match self.accept(&buf[..n], msg.xid, kinds, server) {
                    Ok(Some(offer)) => return Ok(offer),
                    Ok(None) => {}
                    Err(e) => {
                        tracing::debug!(iface = %self.iface.name, error = %e, "ignoring DHCP packet")
                    }
                }
            }
        }
        Err(DhcpError::Timeout {
            iface: self.iface.name.clone(),
            waiting_for,
            tries,
            secs: start.elapsed().as_secs(),
        })
    }

    /// Some(offer) if `bytes` is the reply we wait for; None if it is someone else's.
    fn accept(
        &self,
        bytes: &[u8],
        xid: u32,
        kinds: &[MessageType],
        server: Option<Ipv4Addr>,
    ) -> Result<Option<LeaseOffer>, super::dhcp_packet::ReplyError> {
        let p = DhcpPacket::decode(bytes)?;
        if p.op != OP_REPLY || p.xid != xid || p.chaddr != self.iface.mac {
            return Ok(None);
        }
        let offer = LeaseOffer::from_reply(&p)?;
        let from_wanted = server.is_none_or(|s| s == offer.server);
        Ok((kinds.contains(&offer.kind) && from_wanted).then_some(offer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(lease: u32, t1: Option<u32>, t2: Option<u32>) -> LeaseOffer {
        LeaseOffer {
            kind: MessageType::Ack,
            address: Ipv4Addr::new(10, 0, 0, 5),
            server: Ipv4Addr::new(10, 0, 0, 1),
            prefix_len: 24,
            routers: vec![],
            dns: vec![],
            lease_secs: lease,
            renew_secs: t1,
            rebind_secs: t2,
        }
    }

    fn secs(s: f64) -> Option<Duration> {
        Some(Duration::from_secs_f64(s))
    }

    #[test]
    fn default_renew_and_rebind_are_half_and_seven_eighths() {
        let t = lease_times(&offer(3600, None, None));
        assert_eq!(
            (t.renew, t.rebind, t.expiry),
            (secs(1800.0), secs(3150.0), secs(3600.0))
        );
    }

    #[test]
    fn server_times_are_used_when_sane_and_ignored_when_not() {
        let t = lease_times(&offer(120, Some(5), Some(8)));
        assert_eq!((t.renew, t.rebind), (secs(5.0), secs(8.0)));
        // T2 past the lease, T1 past T2: fall back to the defaults.
        let t = lease_times(&offer(120, Some(110), Some(500)));
        assert_eq!((t.renew, t.rebind), (secs(60.0), secs(105.0)));
        let t = lease_times(&offer(120, Some(0), None));
        assert_eq!(t.renew, secs(60.0));
    }

    #[test]
    fn infinite_and_zero_leases() {
        let t = lease_times(&offer(u32::MAX, None, None));
        assert_eq!((t.renew, t.rebind, t.expiry), (None, None, None));
        let t = lease_times(&offer(0, None, None));
        assert_eq!(t.expiry, secs(1.0));
        assert!(t.renew < t.rebind && t.rebind < t.expiry);
    }

    #[test]
    fn retransmissions_back_off_and_stay_bounded() {
        assert_eq!(retransmit_wait(0, 0), Duration::from_secs(1));
        assert_eq!(retransmit_wait(3, 0), Duration::from_secs(8));
        assert_eq!(retransmit_wait(4, 0), Duration::from_secs(16));
        assert_eq!(retransmit_wait(40, 0), Duration::from_secs(16));
        assert_eq!(retransmit_wait(0, 1499), Duration::from_millis(1499));
    }

    #[test]
    fn renewal_retries_halve_the_time_left() {
        assert_eq!(
            extend_wait(Duration::from_secs(1000)),
            Duration::from_secs(60)
        );
        assert_eq!(extend_wait(Duration::from_secs(10)), Duration::from_secs(5));
        assert_eq!(extend_wait(Duration::from_secs(1)), Duration::from_secs(1));
        assert_eq!(
            extend_wait(Duration::from_millis(300)),
            Duration::from_millis(300)
        );
        assert_eq!(extend_wait(Duration::ZERO), Duration::ZERO);
    }
}

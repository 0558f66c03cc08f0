//! Interface configuration over rtnetlink: link up, IPv4 address add/remove, routes.
//!
//! Why rtnetlink and not ioctls: `SIOCSIFADDR`/`SIOCADDRT` need raw `ioctl` calls on
//! `ifreq`/`rtentry` unions (unsafe, which this crate keeps to `sys/`), cannot set an
//! address and its prefix in one step, cannot replace a route atomically or give it a
//! metric. A netlink socket is an ordinary socket that nix opens safely, the messages are
//! a few fixed headers plus type-length-value attributes, and every request gets an
//! acknowledgement carrying its own errno. The encoders are pure and unit tested.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};

use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, sendto,
    setsockopt, sockopt,
};
use nix::sys::time::TimeVal;

const NLMSG_HDR_LEN: usize = 16;
const NLMSG_ERROR: u16 = libc::NLMSG_ERROR as u16;
const FLAGS_NEW: u16 =
    (libc::NLM_F_REQUEST | libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_REPLACE) as u16;
const FLAGS_DEL: u16 = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
/// Routes we install say they came from DHCP/boot config, so `ip route` shows why.
pub const RTPROT_DHCP: u8 = 16;
pub const RTPROT_BOOT: u8 = libc::RTPROT_BOOT;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("rtnetlink {what}: {}", errno.desc())]
pub struct NetlinkError {
    pub what: String,
    pub errno: Errno,
}

static SEQ: AtomicU32 = AtomicU32::new(1);

/// A netlink message under construction: header, fixed part, attributes.
struct Message(Vec<u8>);

impl Message {
    fn new(kind: u16, flags: u16, seq: u32, fixed: &[u8]) -> Self {
        let mut b = Vec::with_capacity(64);
        b.extend_from_slice(&0u32.to_ne_bytes()); // length, patched in finish()
        b.extend_from_slice(&kind.to_ne_bytes());
        b.extend_from_slice(&flags.to_ne_bytes());
        b.extend_from_slice(&seq.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it
        b.extend_from_slice(fixed);
        Self(b)
    }

    fn attr(mut self, kind: u16, value: &[u8]) -> Self {
        let len = 4 + value.len();
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(value);
        self.0.resize(self.0.len().next_multiple_of(4), 0);
        self
    }

    fn finish(mut self) -> Vec<u8> {
        let len = (self.0.len() as u32).to_ne_bytes();
        self.0[..4].copy_from_slice(&len);
        self.0
    }
}

/// RTM_NEWLINK that sets IFF_UP and touches no other flag.
pub fn encode_link_up(seq: u32, ifindex: u32) -> Vec<u8> {
    let up = libc::IFF_UP as u32;
    let mut ifinfo = Vec::with_capacity(16);
    ifinfo.extend_from_slice(&[libc::AF_UNSPEC as u8, 0]);
    ifinfo.extend_from_slice(&0u16.to_ne_bytes()); // device type
    ifinfo.extend_from_slice(&ifindex.to_ne_bytes());
    ifinfo.extend_from_slice(&up.to_ne_bytes()); // flags
    ifinfo.extend_from_slice(&up.to_ne_bytes()); // change mask
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
    Message::new(libc::RTM_NEWLINK, flags, seq, &ifinfo).finish()
}

/// RTM_NEWADDR (or RTM_DELADDR) for `addr/prefix_len` with its broadcast address.
pub fn encode_address(
    seq: u32,
    add: bool,
    ifindex: u32,
    addr: Ipv4Addr,
    prefix_len: u8,
) -> Vec<u8> {
    let mut ifaddr = vec![libc::AF_INET as u8, prefix_len, 0, libc::RT_SCOPE_UNIVERSE];
    ifaddr.extend_from_slice(&ifindex.to_ne_bytes());
    let (kind, flags) = if add {
        (libc::RTM_NEWADDR, FLAGS_NEW)
    } else {
        (libc::RTM_DELADDR, FLAGS_DEL)
    };
    let host_mask = u32::MAX.checked_shr(u32::from(prefix_len)).unwrap_or(0);
    let broadcast = Ipv4Addr::from(u32::from(addr) | host_mask);
    let mut m = Message::new(kind, flags, seq, &ifaddr)
        .attr(libc::IFA_LOCAL, &addr.octets())
        .attr(libc::IFA_ADDRESS, &addr.octets());
    if prefix_len < 31 {
        m = m.attr(libc::IFA_BROADCAST, &broadcast.octets());
    }
    m.finish()
}

/// A route in the main table to `dst/dst_len` out of `ifindex`, via `gateway` if given
/// (else on-link).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub dst: Ipv4Addr,
    pub dst_len: u8,
    pub gateway: Option<Ipv4Addr>,
    pub ifindex: u32,
    pub metric: u32,
    pub protocol: u8,
}

/// RTM_NEWROUTE (create or replace) or RTM_DELROUTE.
pub fn encode_route(seq: u32, add: bool, r: &Route) -> Vec<u8> {
    let scope = if r.gateway.is_some() {
        libc::RT_SCOPE_UNIVERSE
    } else {
        libc::RT_SCOPE_LINK
    };
    let mut rtmsg = vec![
        libc::AF_INET as u8,
        r.dst_len,
        0, // src_len
        0, // tos
        libc::RT_TABLE_MAIN,
        r.protocol,
        scope,
        libc::RTN_UNICAST,
    ];
    rtmsg.extend_from_slice(&0u32.to_ne_bytes());
    let (kind, flags) = if add {
        (libc::RTM_NEWROUTE, FLAGS_NEW)
    } else {
        (libc::RTM_DELROUTE, FLAGS_DEL)
    };
    let mut m = Message::new(kind, flags, seq, &rtmsg);
    if r.dst_len > 0 {
        m = m.attr(libc::RTA_DST, &r.dst.octets());
    }
    if let Some(gw) = r.gateway {
        m = m.attr(libc::RTA_GATEWAY, &gw.octets());
    }
    m.attr(libc::RTA_OIF, &r.ifindex.to_ne_bytes())
        .attr(libc::RTA_PRIORITY, &r.metric.to_ne_bytes())
        .finish()
}

/// Finds the acknowledgement of `seq` in a buffer of replies: Some(0) for success,
/// Some(errno) for failure, None if it is not there. Bounds-checked throughout.
pub fn parse_ack(buf: &[u8], seq: u32) -> Option<i32> {
    let mut at = 0;
    while let Some(hdr) = buf.get(at..at + NLMSG_HDR_LEN) {
        let len = u32::from_ne_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]) as usize;
        let kind = u16::from_ne_bytes([hdr[4], hdr[5]]);
        let msg_seq = u32::from_ne_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]);
        if len < NLMSG_HDR_LEN {
            return None;
        }
        if kind == NLMSG_ERROR && msg_seq == seq {
            let e = buf.get(at + NLMSG_HDR_LEN..at + NLMSG_HDR_LEN + 4)?;
            return Some(-i32::from_ne_bytes([e[0], e[1], e[2], e[3]]));
        }
        at += len.next_multiple_of(4);
    }
    None
}

/// Sends one request and waits (at most a second) for its acknowledgement.
fn request(
    what: impl Fn() -> String,
    build: impl FnOnce(u32) -> Vec<u8>,
) -> Result<(), NetlinkError> {
    let fail = |errno| NetlinkError {
        what: what(),
        errno,
    };
    let sock: OwnedFd = nix::sys::socket::socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )
    .map_err(fail)?;
    bind(sock.as_raw_fd(), &NetlinkAddr::new(0, 0)).map_err(fail)?;
    setsockopt(&sock, sockopt::ReceiveTimeout, &TimeVal::new(1, 0)).map_err(fail)?;
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let msg = build(seq);
    sendto(
        sock.as_raw_fd(),
        &msg,
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )
    .map_err(fail)?;
    let mut buf = vec![0u8; 8192];
    // Other messages (none expected on a fresh socket) are skipped; a missing ack times out.
    for _ in 0..8 {
        let n = recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty()).map_err(fail)?;
        match parse_ack(&buf[..n], seq) {
            Some(0) => return Ok(()),
            Some(e) => return Err(fail(Errno::from_raw(e))),
            None => {}
        }
    }
    Err(fail(Errno::ETIMEDOUT))
}

pub fn link_up(name: &str, ifindex: u32) -> Result<(), NetlinkError> {
    request(
        || format!("set {name} up"),
        |seq| encode_link_up(seq, ifindex),
    )
}

pub fn add_address(
    name: &str,
    ifindex: u32,
    addr: Ipv4Addr,
    prefix_len: u8,
) -> Result<(), NetlinkError> {
    request(
        || format!("add address {addr}/{prefix_len} to {name}"),
        |seq| encode_address(seq, true, ifindex, addr, prefix_len),
    )
}

pub fn del_address(
    name: &str,
    ifindex: u32,
    addr: Ipv4Addr,
    prefix_len: u8,
) -> Result<(), NetlinkError> {
    request(
        || format!("remove address {addr}/{prefix_len} from {name}"),
        |seq| encode_address(seq, false, ifindex, addr, prefix_len),
    )
}

/// Installs a default route via `gateway`. A gateway outside the interface's subnet
/// (a /32 lease, common in clouds) first gets an on-link host route, or the kernel
/// refuses the default route with ENETUNREACH.
pub fn set_default_route(
    name: &str,
    ifindex: u32,
    local: Ipv4Addr,
    prefix_len: u8,
    gateway: Ipv4Addr,
    metric: u32,
    protocol: u8,
) -> Result<(), NetlinkError> {
    if !same_subnet(local, gateway, prefix_len) {
        let host = Route {
            dst: gateway,
            dst_len: 32,
            gateway: None,
            ifindex,
            metric,
            protocol,
        };
        request(
            || format!("add on-link route to gateway {gateway} on {name}"),
            |seq| encode_route(seq, true, &host),
        )?;
    }
    let default = Route {
        dst: Ipv4Addr::UNSPECIFIED,
        dst_len: 0,
        gateway: Some(gateway),
        ifindex,
        metric,
        protocol,
    };
    request(
        || format!("add default route via {gateway} on {name}"),
        |seq| encode_route(seq, true, &default),
    )
}

pub fn same_subnet(a: Ipv4Addr, b: Ipv4Addr, prefix_len: u8) -> bool {
    let mask = u32::MAX
        .checked_shl(32 - u32::from(prefix_len))
        .unwrap_or(0);
    u32::from(a) & mask == u32::from(b) & mask
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(msg: &[u8], fixed_len: usize) -> Vec<(u16, Vec<u8>)> {
        let mut out = Vec::new();
        let mut at = NLMSG_HDR_LEN + fixed_len;
        while at + 4 <= msg.len() {
            let len = u16::from_ne_bytes([msg[at], msg[at + 1]]) as usize;
            let kind = u16::from_ne_bytes([msg[at + 2], msg[at + 3]]);
            out.push((kind, msg[at + 4..at + len].to_vec()));
            at += len.next_multiple_of(4);
        }
        out
    }

    #[test]
    fn address_message_has_length_prefix_and_attributes() {
        let m = encode_address(7, true, 3, Ipv4Addr::new(10, 0, 0, 5), 24);
        assert_eq!(
            u32::from_ne_bytes([m[0], m[1], m[2], m[3]]) as usize,
            m.len()
        );
        assert_eq!(u16::from_ne_bytes([m[4], m[5]]), libc::RTM_NEWADDR);
        assert_eq!(u32::from_ne_bytes([m[8], m[9], m[10], m[11]]), 7);
        assert_eq!(&m[16..20], &[libc::AF_INET as u8, 24, 0, 0]);
        assert_eq!(u32::from_ne_bytes([m[20], m[21], m[22], m[23]]), 3);
        let a = attrs(&m, 8);
        assert!(a.contains(&(libc::IFA_LOCAL, vec![10, 0, 0, 5])));
        assert!(a.contains(&(libc::IFA_BROADCAST, vec![10, 0, 0, 255])));
    }

    #[test]
    fn default_route_message_carries_gateway_oif_and_metric() {
        let r = Route {
            dst: Ipv4Addr::UNSPECIFIED,
            dst_len: 0,
            gateway: Some(Ipv4Addr::new(10, 0, 0, 1)),
            ifindex: 4,
            metric: 1004,
            protocol: RTPROT_DHCP,
        };
        let m = encode_route(1, true, &r);
        assert_eq!(m[16 + 4], libc::RT_TABLE_MAIN);
        assert_eq!(m[16 + 5], RTPROT_DHCP);
        let a = attrs(&m, 12);
        assert!(!a.iter().any(|(k, _)| *k == libc::RTA_DST));
        assert!(a.contains(&(libc::RTA_GATEWAY, vec![10, 0, 0, 1])));
        assert!(a.contains(&(libc::RTA_OIF, 4u32.to_ne_bytes().to_vec())));
        assert!(a.contains(&(libc::RTA_PRIORITY, 1004u32.to_ne_bytes().to_vec())));
    }

    #[test]
    fn acks_are_found_and_garbage_is_not_read_past() {
        let mut ack = Vec::new();
        ack.extend_from_slice(&36u32.to_ne_bytes());
        ack.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        ack.extend_from_slice(&0u16.to_ne_bytes());
        ack.extend_from_slice(&9u32.to_ne_bytes());
        ack.extend_from_slice(&0u32.to_ne_bytes());
        ack.extend_from_slice(&(-libc::EEXIST).to_ne_bytes());
        ack.extend_from_slice(&[0; 16]);
        assert_eq!(parse_ack(&ack, 9), Some(libc::EEXIST));
        assert_eq!(parse_ack(&ack, 8), None);
        for n in 0..ack.len() {
            let _ = parse_ack(&ack[..n], 9);
        }
        let mut zero_len = ack.clone();
        zero_len[..4].copy_from_slice(&0u32.to_ne_bytes());
        assert_eq!(parse_ack(&zero_len, 8), None);
    }

    #[test]
    fn subnets() {
        let a = Ipv4Addr::new(10, 0, 0, 5);
        assert!(same_subnet(a, Ipv4Addr::new(10, 0, 0, 1), 24));
        assert!(!same_subnet(a, Ipv4Addr::new(10, 0, 1, 1), 24));
        assert!(!same_subnet(a, Ipv4Addr::new(10, 0, 0, 1), 32));
        assert!(same_subnet(a, Ipv4Addr::new(192, 0, 0, 1), 0));
    }
}

//! DHCPv4 messages (RFC 2131, options RFC 2132) as bytes and back. Pure: no sockets, no
//! clock. Decoding treats every byte as hostile: a length that runs past the buffer is an
//! error, never a panic or an over-read.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// op, htype, hlen, hops, xid, secs, flags, four addresses, chaddr, sname, file.
const FIXED_LEN: usize = 236;
const MAGIC: [u8; 4] = [99, 130, 83, 99];
/// The smallest message BOOTP relays and some servers accept (RFC 1542).
const MIN_LEN: usize = 300;
const BROADCAST_FLAG: u16 = 0x8000;
const HTYPE_ETHERNET: u8 = 1;

pub const OP_REQUEST: u8 = 1;
pub const OP_REPLY: u8 = 2;

pub const OPT_PAD: u8 = 0;
pub const OPT_SUBNET_MASK: u8 = 1;
pub const OPT_ROUTER: u8 = 3;
pub const OPT_DNS: u8 = 6;
pub const OPT_HOSTNAME: u8 = 12;
pub const OPT_REQUESTED_IP: u8 = 50;
pub const OPT_LEASE_TIME: u8 = 51;
pub const OPT_MESSAGE_TYPE: u8 = 53;
pub const OPT_SERVER_ID: u8 = 54;
pub const OPT_PARAMETER_LIST: u8 = 55;
pub const OPT_MAX_SIZE: u8 = 57;
pub const OPT_RENEWAL_TIME: u8 = 58;
pub const OPT_REBINDING_TIME: u8 = 59;
pub const OPT_CLIENT_ID: u8 = 61;
pub const OPT_END: u8 = 255;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    Discover = 1,
    Offer = 2,
    Request = 3,
    Decline = 4,
    Ack = 5,
    Nak = 6,
    Release = 7,
    Inform = 8,
}

impl MessageType {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Discover,
            2 => Self::Offer,
            3 => Self::Request,
            4 => Self::Decline,
            5 => Self::Ack,
            6 => Self::Nak,
            7 => Self::Release,
            8 => Self::Inform,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("DHCP packet of {0} bytes is shorter than the 240-byte header")]
    Short(usize),
    #[error("not a DHCP packet: magic cookie is {0:02x?}")]
    Magic([u8; 4]),
    #[error("DHCP option {code} at offset {offset} claims {len} bytes but only {left} remain")]
    OptionOverrun {
        code: u8,
        offset: usize,
        len: usize,
        left: usize,
    },
    #[error("DHCP option {code} is cut off at the end of the packet (no length byte)")]
    OptionTruncated { code: u8 },
    #[error("DHCP option {code} has length {len}: {expected}")]
    OptionLength {
        code: u8,
        len: usize,
        expected: &'static str,
    },
    #[error("DHCP option 53 (message type) has unknown value {0}")]
    UnknownMessageType(u8),
    #[error("hardware address length {0} is not 6 (Ethernet)")]
    HardwareLength(u8),
}

/// A DHCP message; `options` holds each option's value once (repeated options are joined,
/// RFC 3396), without pad and end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpPacket {
    pub op: u8,
    pub xid: u32,
    pub secs: u16,
    pub broadcast: bool,
    pub ciaddr: Ipv4Addr,
    pub yiaddr: Ipv4Addr,
    pub siaddr: Ipv4Addr,
    pub giaddr: Ipv4Addr,
    pub chaddr: [u8; 6],
    pub options: BTreeMap<u8, Vec<u8>>,
}

impl DhcpPacket {
    /// A client message of `kind` with the options every client message carries.
    pub fn client(kind: MessageType, xid: u32, mac: [u8; 6]) -> Self {
        let mut options = BTreeMap::new();
        options.insert(OPT_MESSAGE_TYPE, vec![kind as u8]);
        // Client id: type 1 (Ethernet) + MAC, so servers key the lease on it (RFC 2132 9.14).
        let mut id = vec![HTYPE_ETHERNET];
        id.extend_from_slice(&mac);
        options.insert(OPT_CLIENT_ID, id);
        options.insert(OPT_MAX_SIZE, 1500u16.to_be_bytes().to_vec());
        options.insert(
            OPT_PARAMETER_LIST,
            vec![
                OPT_SUBNET_MASK,
                OPT_ROUTER,
                OPT_DNS,
                OPT_HOSTNAME,
                OPT_LEASE_TIME,
                OPT_RENEWAL_TIME,
                OPT_REBINDING_TIME,
            ],
        );
        Self {
            op: OP_REQUEST,
            xid,
            secs: 0,
            // Replies to an address-less interface must be broadcast: the kernel has no
            // address to accept a unicast to yiaddr on.
            broadcast: true,
            ciaddr: Ipv4Addr::UNSPECIFIED,
            yiaddr: Ipv4Addr::UNSPECIFIED,
            siaddr: Ipv4Addr::UNSPECIFIED,
            giaddr: Ipv4Addr::UNSPECIFIED,
            chaddr: mac,
            options,
        }
    }

    pub fn set_ip_option(&mut self, code: u8, ip: Ipv4Addr) {
        self.options.insert(code, ip.octets().to_vec());
    }

    /// Sets a text option, cut to the 255 bytes one option can carry.
    pub fn set_text_option(&mut self, code: u8, text: &str) {
        let bytes = text.as_bytes();
        self.options
            .insert(code, bytes[..bytes.len().min(255)].to_vec());
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(MIN_LEN + 64);
        out.push(self.op);
        out.push(HTYPE_ETHERNET);
        out.push(6);
        out.push(0);
        out.extend_from_slice(&self.xid.to_be_bytes());
        out.extend_from_slice(&self.secs.to_be_bytes());
        let flags = if self.broadcast { BROADCAST_FLAG } else { 0 };
        out.extend_from_slice(&flags.to_be_bytes());
        for a in [self.ciaddr, self.yiaddr, self.siaddr, self.giaddr] {
            out.extend_from_slice(&a.octets());
        }
        out.extend_from_slice(&self.chaddr);
        out.resize(FIXED_LEN, 0); // rest of chaddr, sname, file
        out.extend_from_slice(&MAGIC);
        for (&code, value) in &self.options {
            // Longer values go out as several options of the same code (RFC 3396).
            let mut chunks = value.chunks(255).peekable();
            if chunks.peek().is_none() {
                out.extend_from_slice(&[code, 0]);
            }
            for chunk in chunks {
                out.push(code);
                out.push(chunk.len() as u8);
                out.extend_from_slice(chunk);
            }
        }
        out.push(OPT_END);
        if out.len() < MIN_LEN {
            out.resize(MIN_LEN, OPT_PAD);
        }
        out
    }

    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        if buf.len() < FIXED_LEN + MAGIC.len() {
            return Err(DecodeError::Short(buf.len()));
        }
        let magic = [buf[236], buf[237], buf[238], buf[239]];
        if magic != MAGIC {
            return Err(DecodeError::Magic(magic));
        }
        if buf[2] != 6 {
            return Err(DecodeError::HardwareLength(buf[2]));
        }
        let ip = |at: usize| Ipv4Addr::new(buf[at], buf[at + 1], buf[at + 2], buf[at + 3]);
        let mut chaddr = [0u8; 6];
        chaddr.copy_from_slice(&buf[28..34]);
        Ok(Self {
            op: buf[0],
            xid: u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]),
            secs: u16::from_be_bytes([buf[8], buf[9]]),
            broadcast: u16::from_be_bytes([buf[10], buf[11]]) & BROADCAST_FLAG != 0,
            ciaddr: ip(12),
            yiaddr: ip(16),
            siaddr: ip(20),
            giaddr: ip(24),
            chaddr,
            options: decode_options(&buf[FIXED_LEN + MAGIC.len()..])?,
        })
    }

    pub fn message_type(&self) -> Result<Option<MessageType>, DecodeError> {
        match self.options.get(&OPT_MESSAGE_TYPE).map(Vec::as_slice) {
            None => Ok(None),
            Some([v]) => MessageType::from_u8(*v)
                .map(Some)
                .ok_or(DecodeError::UnknownMessageType(*v)),
            Some(v) => Err(DecodeError::OptionLength {
                code: OPT_MESSAGE_TYPE,
                len: v.len(),
                expected: "must be 1",
            }),
        }
    }

    pub fn ip_option(&self, code: u8) -> Result<Option<Ipv4Addr>, DecodeError> {
        match self.options.get(&code).map(Vec::as_slice) {
            None => Ok(None),
            Some(&[a, b, c, d]) => Ok(Some(Ipv4Addr::new(a, b, c, d))),
            Some(v) => Err(DecodeError::OptionLength {
                code,
                len: v.len(),
                expected: "must be 4 (one IPv4 address)",
            }),
        }
    }

    /// A list of addresses (routers, DNS servers); an empty option is an error.
    pub fn ip_list_option(&self, code: u8) -> Result<Vec<Ipv4Addr>, DecodeError> {
        match self.options.get(&code) {
            None => Ok(Vec::new()),
            Some(v) if v.is_empty() || v.len() % 4 != 0 => Err(DecodeError::OptionLength {
                code,
                len: v.len(),
                expected: "must be a non-zero multiple of 4 (IPv4 addresses)",
            }),
            Some(v) => Ok(v
                .chunks_exact(4)
                .map(|c| Ipv4Addr::new(c[0], c[1], c[2], c[3]))
                .collect()),
        }
    }

    pub fn u32_option(&self, code: u8) -> Result<Option<u32>, DecodeError> {
        match self.options.get(&code).map(Vec::as_slice) {
            None => Ok(None),
            Some(&[a, b, c, d]) => Ok(Some(u32::from_be_bytes([a, b, c, d]))),
            Some(v) => Err(DecodeError::OptionLength {
                code,
                len: v.len(),
                expected: "must be 4 (a 32-bit number)",
            }),
        }
    }
}

fn decode_options(buf: &[u8]) -> Result<BTreeMap<u8, Vec<u8>>, DecodeError> {
    let mut options: BTreeMap<u8, Vec<u8>> = BTreeMap::new();
    let mut at = 0;
    while let Some(&code) = buf.get(at) {
        match code {
            OPT_PAD => at += 1,
            OPT_END => break,
            _ => {
                let Some(&len) = buf.get(at + 1) else {
                    return Err(DecodeError::OptionTruncated { code });
                };
                let len = usize::from(len);
                let start = at + 2;
                let Some(value) = buf.get(start..start + len) else {
                    return Err(DecodeError::OptionOverrun {
                        code,
                        offset: at,
                        len,
                        left: buf.len() - start,
                    });
                };
                options.entry(code).or_default().extend_from_slice(value);
                at = start + len;
            }
        }
    }
    Ok(options)
}

/// What an OFFER or ACK says, checked: every field we rely on is present and well formed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseOffer {
    pub kind: MessageType,
    pub address: Ipv4Addr,
    pub server: Ipv4Addr,
    pub prefix_len: u8,
    pub routers: Vec<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub lease_secs: u32,
    pub renew_secs: Option<u32>,
    pub rebind_secs: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("DHCP reply has no message type (option 53)")]
    NoMessageType,
    #[error("DHCP {0:?} lacks option {1}")]
    Missing(MessageType, u8),
    #[error("DHCP reply offers unusable address {0}")]
    BadAddress(Ipv4Addr),
    #[error("DHCP subnet mask {0} is not contiguous")]
    BadMask(Ipv4Addr),
}

impl LeaseOffer {
    /// Reads an OFFER, ACK or NAK. A NAK carries no lease: only `kind` and `server` mean
    /// anything then.
    pub fn from_reply(p: &DhcpPacket) -> Result<Self, ReplyError> {
        let kind = p.message_type()?.ok_or(ReplyError::NoMessageType)?;
        let server = p.ip_option(OPT_SERVER_ID)?;
        if kind == MessageType::Nak {
            return Ok(Self {
                kind,
                address: Ipv4Addr::UNSPECIFIED,
                server: server.unwrap_or(Ipv4Addr::UNSPECIFIED),
                prefix_len: 0,
                routers: Vec::new(),
                dns: Vec::new(),
                lease_secs: 0,
                renew_secs: None,
                rebind_secs: None,
            });
        }
        let server = server.ok_or(ReplyError::Missing(kind, OPT_SERVER_ID))?;
        let address = p.yiaddr;
        if address.is_unspecified() || address.is_broadcast() || address.is_multicast() {
            return Err(ReplyError::BadAddress(address));
        }
        let prefix_len = match p.ip_option(OPT_SUBNET_MASK)? {
            Some(mask) => mask_to_prefix(mask).ok_or(ReplyError::BadMask(mask))?,
            None => classful_prefix(address),
        };
        Ok(Self {
            kind,
            address,
            server,
            prefix_len,
            routers: p.ip_list_option(OPT_ROUTER)?,
            dns: p.ip_list_option(OPT_DNS)?,
            lease_secs: p
                .u32_option(OPT_LEASE_TIME)?
                .ok_or(ReplyError::Missing(kind, OPT_LEASE_TIME))?,
            renew_secs: p.u32_option(OPT_RENEWAL_TIME)?,
            rebind_secs: p.u32_option(OPT_REBINDING_TIME)?,
        })
    }
}

/// The prefix length of a netmask, or None if its ones are not contiguous.
pub fn mask_to_prefix(mask: Ipv4Addr) -> Option<u8> {
    let m = u32::from(mask);
    let ones = m.leading_ones();
    (m.checked_shl(ones).unwrap_or(0) == 0).then_some(ones as u8)
}

/// The old class A/B/C prefix, what the kernel assumes when no netmask is given.
pub fn classful_prefix(ip: Ipv4Addr) -> u8 {
    match ip.octets()[0] {
        0..=127 => 8,
        128..=191 => 16,
        _ => 24,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

    fn ack() -> DhcpPacket {
        let mut p = DhcpPacket::client(MessageType::Ack, 0xdead_beef, MAC);
        p.op = OP_REPLY;
        p.options.clear();
        p.options.insert(OPT_MESSAGE_TYPE, vec![5]);
        p.yiaddr = Ipv4Addr::new(10, 0, 0, 7);
        p.set_ip_option(OPT_SERVER_ID, Ipv4Addr::new(10, 0, 0, 1));
        p.set_ip_option(OPT_SUBNET_MASK, Ipv4Addr::new(255, 255, 255, 0));
        p.options.insert(OPT_ROUTER, vec![10, 0, 0, 1, 10, 0, 0, 2]);
        p.options
            .insert(OPT_LEASE_TIME, 3600u32.to_be_bytes().to_vec());
        p
    }

    #[test]
    fn discover_round_trips_with_broadcast_flag_and_client_options() {
        let mut p = DhcpPacket::client(MessageType::Discover, 42, MAC);
        p.set_text_option(OPT_HOSTNAME, "node-1");
        let bytes = p.encode();
        assert!(bytes.len() >= MIN_LEN);
        assert_eq!(&bytes[236..240], &MAGIC);
        assert_eq!(bytes[10] & 0x80, 0x80, "broadcast flag");
        let back = DhcpPacket::decode(&bytes).unwrap();
        assert_eq!(back, p);
        assert_eq!(back.message_type().unwrap(), Some(MessageType::Discover));
        assert_eq!(
            back.options[&OPT_CLIENT_ID],
            [1, 0x52, 0x54, 0, 0x12, 0x34, 0x56]
        );
        assert_eq!(back.options[&OPT_HOSTNAME], b"node-1");
    }

    #[test]
    fn ack_reads_into_a_lease() {
        let lease = LeaseOffer::from_reply(&DhcpPacket::decode(&ack().encode()).unwrap()).unwrap();
        assert_eq!(lease.kind, MessageType::Ack);
        assert_eq!(lease.address, Ipv4Addr::new(10, 0, 0, 7));
        assert_eq!(lease.prefix_len, 24);
        assert_eq!(lease.routers.len(), 2);
        assert_eq!(lease.lease_secs, 3600);
        assert_eq!(lease.renew_secs, None);
    }

    #[test]
    fn long_options_split_and_join_again() {
        let mut p = ack();
        let long: Vec<u8> = (0..600u32).map(|i| i as u8).collect();
        p.options.insert(200, long.clone());
        let back = DhcpPacket::decode(&p.encode()).unwrap();
        assert_eq!(back.options[&200], long);
    }

    #[test]
    fn short_and_foreign_packets_are_errors() {
        assert_eq!(DhcpPacket::decode(&[]), Err(DecodeError::Short(0)));
        assert_eq!(DhcpPacket::decode(&[0; 239]), Err(DecodeError::Short(239)));
        let mut bytes = ack().encode();
        bytes[236] = 0;
        assert!(matches!(
            DhcpPacket::decode(&bytes),
            Err(DecodeError::Magic(_))
        ));
        let mut bytes = ack().encode();
        bytes[2] = 16;
        assert_eq!(
            DhcpPacket::decode(&bytes),
            Err(DecodeError::HardwareLength(16))
        );
    }

    #[test]
    fn option_running_past_the_end_is_an_error() {
        let mut bytes = ack().encode()[..240].to_vec();
        bytes.extend_from_slice(&[OPT_HOSTNAME, 200, b'a', b'b']);
        assert!(matches!(
            DhcpPacket::decode(&bytes),
            Err(DecodeError::OptionOverrun {
                code: 12,
                len: 200,
                left: 2,
                ..
            })
        ));
        let mut bytes = ack().encode()[..240].to_vec();
        bytes.push(OPT_HOSTNAME);
        assert_eq!(
            DhcpPacket::decode(&bytes),
            Err(DecodeError::OptionTruncated { code: 12 })
        );
    }

    #[test]
    fn missing_end_option_is_tolerated() {
        let mut bytes = ack().encode()[..240].to_vec();
        bytes.extend_from_slice(&[OPT_MESSAGE_TYPE, 1, 5, OPT_PAD, OPT_PAD]);
        let p = DhcpPacket::decode(&bytes).unwrap();
        assert_eq!(p.message_type().unwrap(), Some(MessageType::Ack));
    }

    #[test]
    fn wrong_option_lengths_are_errors_not_guesses() {
        let mut p = ack();
        p.options.insert(OPT_SERVER_ID, vec![10, 0, 0]);
        assert!(matches!(
            LeaseOffer::from_reply(&p),
            Err(ReplyError::Decode(DecodeError::OptionLength {
                code: 54,
                len: 3,
                ..
            }))
        ));
        let mut p = ack();
        p.options.insert(OPT_ROUTER, vec![10, 0, 0, 1, 10]);
        assert!(LeaseOffer::from_reply(&p).is_err());
        let mut p = ack();
        p.options.insert(OPT_ROUTER, vec![]);
        assert!(LeaseOffer::from_reply(&p).is_err());
        let mut p = ack();
        p.options.insert(OPT_MESSAGE_TYPE, vec![5, 5]);
        assert!(LeaseOffer::from_reply(&p).is_err());
        let mut p = ack();
        p.options.insert(OPT_MESSAGE_TYPE, vec![99]);
        assert_eq!(
            LeaseOffer::from_reply(&p),
            Err(ReplyError::Decode(DecodeError::UnknownMessageType(99)))
        );
        let mut p = ack();
        p.set_ip_option(OPT_SUBNET_MASK, Ipv4Addr::new(255, 0, 255, 0));
        assert!(matches!(
            LeaseOffer::from_reply(&p),
            Err(ReplyError::BadMask(_))
        ));
    }

    #[test]
    fn ack_without_lease_time_or_server_or_address_is_refused() {
        let mut p = ack();
        p.options.remove(&OPT_LEASE_TIME);
        assert_eq!(
            LeaseOffer::from_reply(&p),
            Err(ReplyError::Missing(MessageType::Ack, OPT_LEASE_TIME))
        );
        let mut p = ack();
        p.options.remove(&OPT_SERVER_ID);
        assert!(LeaseOffer::from_reply(&p).is_err());
        let mut p = ack();
        p.yiaddr = Ipv4Addr::UNSPECIFIED;
        assert!(matches!(
            LeaseOffer::from_reply(&p),
            Err(ReplyError::BadAddress(_))
        ));
    }

    #[test]
    fn every_truncation_and_every_byte_flip_decodes_without_panicking() {
        let bytes = ack().encode();
        for n in 0..bytes.len() {
            let _ = DhcpPacket::decode(&bytes[..n]).map(|p| LeaseOffer::from_reply(&p));
        }
        for i in 236..bytes.len() {
            for v in [0u8, 1, 4, 53, 254, 255] {
                let mut b = bytes.clone();
                b[i] = v;
                let _ = DhcpPacket::decode(&b).map(|p| LeaseOffer::from_reply(&p));
            }
        }
    }

    #[test]
    fn masks() {
        assert_eq!(mask_to_prefix(Ipv4Addr::new(255, 255, 255, 0)), Some(24));
        assert_eq!(mask_to_prefix(Ipv4Addr::new(255, 255, 255, 255)), Some(32));
        assert_eq!(mask_to_prefix(Ipv4Addr::new(0, 0, 0, 0)), Some(0));
        assert_eq!(mask_to_prefix(Ipv4Addr::new(255, 255, 128, 0)), Some(17));
        assert_eq!(mask_to_prefix(Ipv4Addr::new(255, 0, 255, 0)), None);
        assert_eq!(classful_prefix(Ipv4Addr::new(10, 1, 2, 3)), 8);
        assert_eq!(classful_prefix(Ipv4Addr::new(172, 16, 0, 1)), 16);
        assert_eq!(classful_prefix(Ipv4Addr::new(192, 168, 0, 1)), 24);
    }
}

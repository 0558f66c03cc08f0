//! The kernel's `ip=` boot parameter (Documentation/admin-guide/nfs/nfsroot.rst):
//! `ip=<client-ip>:<server-ip>:<gw-ip>:<netmask>:<hostname>:<device>:<autoconf>:<dns0>:<dns1>:<ntp0>`,
//! or just `ip=dhcp`, `ip=off`. Pure parsing; nothing here touches an interface.

use std::net::Ipv4Addr;

use super::dhcp_packet::{classful_prefix, mask_to_prefix};

/// What `ip=` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IpParam {
    /// No network configuration at all (`off`, `none`).
    Off,
    /// DHCP, on `device` only if named; `requested` is a client address to ask for.
    Dhcp {
        device: Option<String>,
        hostname: Option<String>,
        requested: Option<Ipv4Addr>,
    },
    Static(StaticIp),
}

/// A static configuration from `ip=`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticIp {
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Option<Ipv4Addr>,
    pub server: Option<Ipv4Addr>,
    pub hostname: Option<String>,
    /// None: the first interface (sorted by name) with carrier.
    pub device: Option<String>,
    pub dns: Vec<Ipv4Addr>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("kernel command line ip=: {field} {value:?} {problem}")]
pub struct IpParamError {
    pub field: &'static str,
    pub value: String,
    pub problem: String,
}

const FIELDS: [&str; 10] = [
    "client-ip",
    "server-ip",
    "gw-ip",
    "netmask",
    "hostname",
    "device",
    "autoconf",
    "dns0",
    "dns1",
    "ntp0",
];

/// Finds `ip=` on a kernel command line (the last one wins, as in the kernel) and parses
/// it. `Ok(None)`: the command line has no `ip=`.
pub fn parse_ip_param(cmdline: &str) -> Result<Option<IpParam>, IpParamError> {
    cmdline
        .split_whitespace()
        .filter_map(|word| word.strip_prefix("ip="))
        .next_back()
        .map(parse_ip_value)
        .transpose()
}

/// Parses the value of `ip=`.
pub fn parse_ip_value(value: &str) -> Result<IpParam, IpParamError> {
    let bad = |field: &'static str, v: &str, problem: &str| IpParamError {
        field,
        value: v.to_string(),
        problem: problem.to_string(),
    };
    match value {
        "off" | "none" => return Ok(IpParam::Off),
        "dhcp" | "on" | "any" => {
            return Ok(IpParam::Dhcp {
                device: None,
                hostname: None,
                requested: None,
            });
        }
        "bootp" | "rarp" | "both" => {
            return Err(bad("autoconf", value, "is not supported: use dhcp or off"));
        }
        _ => {}
    }
    let parts: Vec<&str> = value.split(':').collect();
    if parts.len() > FIELDS.len() {
        return Err(bad(
            "value",
            value,
            "has more than 10 ':'-separated fields (IPv6 is not supported)",
        ));
    }
    let field = |i: usize| parts.get(i).copied().unwrap_or("");
    let ip = |i: usize| -> Result<Option<Ipv4Addr>, IpParamError> {
        let v = field(i);
        if v.is_empty() {
            return Ok(None);
        }
        v.parse()
            .map(Some)
            .map_err(|_| bad(FIELDS[i], v, "is not an IPv4 address like 192.0.2.10"))
    };
    let client = ip(0)?;
    let server = ip(1)?;
    let gateway = ip(2)?;
    let mask = ip(3)?;
    let hostname = match field(4) {
        "" => None,
        h if h.len() <= 64
            && h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.') =>
        {
            Some(h.to_string())
        }
        h => {
            return Err(bad(
                "hostname",
                h,
                "is not a hostname: use [A-Za-z0-9.-], at most 64 characters",
            ));
        }
    };
    let device = match field(5) {
        "" => None,
        d if d.len() < libc::IFNAMSIZ
            && d != "."
            && d != ".."
            && !d.bytes().any(|b| b == b'/' || b.is_ascii_whitespace()) =>
        {
            Some(d.to_string())
        }
        d => {
            return Err(bad(
                "device",
                d,
                "is not an interface name: at most 15 characters, no '/' or spaces",
            ));
        }
    };
    let dns: Vec<Ipv4Addr> = [ip(7)?, ip(8)?].into_iter().flatten().collect();
    ip(9)?; // ntp0: checked, unused (celld keeps no NTP client)
    let want_dhcp = match field(6) {
        "" => client.is_none(),
        "off" | "none" | "static" => false,
        "on" | "any" | "dhcp" => true,
        a @ ("bootp" | "rarp" | "both") => {
            return Err(bad("autoconf", a, "is not supported: use dhcp or off"));
        }
        a => return Err(bad("autoconf", a, "is not one of off, none, on, any, dhcp")),
    };
    if want_dhcp {
        return Ok(IpParam::Dhcp {
            device,
            hostname,
            requested: client,
        });
    }
    let Some(address) = client else {
        return Ok(IpParam::Off);
    };
    let prefix_len = match mask {
        Some(m) => mask_to_prefix(m).ok_or_else(|| {
            bad(
                "netmask",
                field(3),
                "is not a netmask: its one bits must be contiguous, like 255.255.255.0",
            )
        })?,
        None => classful_prefix(address),
    };
    if gateway.is_some_and(|gw| gw == address || gw.is_unspecified() || gw.is_broadcast()) {
        return Err(bad(
            "gw-ip",
            field(2),
            "cannot be a gateway for this address",
        ));
    }
    Ok(IpParam::Static(StaticIp {
        address,
        prefix_len,
        gateway,
        server,
        hostname,
        device,
        dns,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn full_static_form() {
        let p = parse_ip_value(
            "10.0.2.15:10.0.2.2:10.0.2.1:255.255.255.0:node-a:eth0:off:1.1.1.1:8.8.8.8",
        )
        .unwrap();
        assert_eq!(
            p,
            IpParam::Static(StaticIp {
                address: ip("10.0.2.15"),
                prefix_len: 24,
                gateway: Some(ip("10.0.2.1")),
                server: Some(ip("10.0.2.2")),
                hostname: Some("node-a".into()),
                device: Some("eth0".into()),
                dns: vec![ip("1.1.1.1"), ip("8.8.8.8")],
            })
        );
    }

    #[test]
    fn short_static_forms() {
        let IpParam::Static(s) = parse_ip_value("192.168.1.9").unwrap() else {
            panic!("not static")
        };
        assert_eq!((s.prefix_len, s.gateway, s.device), (24, None, None));
        let IpParam::Static(s) =
            parse_ip_value("10.1.1.1::10.1.1.254:255.255.0.0::eth1:none").unwrap()
        else {
            panic!("not static")
        };
        assert_eq!(s.prefix_len, 16);
        assert_eq!(s.device.as_deref(), Some("eth1"));
    }

    #[test]
    fn keywords() {
        assert_eq!(parse_ip_value("off").unwrap(), IpParam::Off);
        assert_eq!(parse_ip_value("none").unwrap(), IpParam::Off);
        assert_eq!(parse_ip_value("::::::off").unwrap(), IpParam::Off);
        for v in ["dhcp", "on", "any", "::::::dhcp", ""] {
            assert!(
                matches!(parse_ip_value(v).unwrap(), IpParam::Dhcp { .. }),
                "{v}"
            );
        }
        assert_eq!(
            parse_ip_value(":::::eth0:dhcp").unwrap(),
            IpParam::Dhcp {
                device: Some("eth0".into()),
                hostname: None,
                requested: None
            }
        );
    }

    #[test]
    fn cmdline_search_takes_the_last_ip() {
        assert_eq!(parse_ip_param("console=ttyS0 quiet").unwrap(), None);
        assert_eq!(
            parse_ip_param("console=ttyS0 ip=dhcp celld.master=x:7000 ip=off").unwrap(),
            Some(IpParam::Off)
        );
        assert!(parse_ip_param("vip=1.2.3.4").unwrap().is_none());
    }

    #[test]
    fn errors_name_the_bad_part() {
        let cases = [
            ("10.0.0.300", "client-ip"),
            ("10.0.0.1:x", "server-ip"),
            ("10.0.0.1::10.0.0", "gw-ip"),
            ("10.0.0.1:::255.0.255.0", "netmask"),
            ("10.0.0.1::::bad_name", "hostname"),
            ("10.0.0.1:::::a/b", "device"),
            ("10.0.0.1:::::averyveryverylongname", "device"),
            ("10.0.0.1::::::maybe", "autoconf"),
            ("10.0.0.1::::::bootp", "autoconf"),
            ("rarp", "autoconf"),
            ("10.0.0.1:::::::1.2.3", "dns0"),
            ("10.0.0.1::10.0.0.1", "gw-ip"),
            ("fe80::1:2:3:4:5:6:7:8:9", "value"),
        ];
        for (v, field) in cases {
            let e = parse_ip_value(v).unwrap_err();
            assert_eq!(e.field, field, "{v}: {e}");
            assert!(e.to_string().contains(field), "{e}");
        }
        let e = parse_ip_param("ip=10.0.0.1:::255.0.255.0").unwrap_err();
        assert_eq!(
            e.to_string(),
            "kernel command line ip=: netmask \"255.0.255.0\" is not a netmask: its one bits must be contiguous, like 255.255.255.0"
        );
    }
}

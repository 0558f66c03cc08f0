//! Which interfaces the node has, read from `/sys/class/net`, and waiting for carrier.
//! Only reads sysfs; setting links up is `rtnetlink`'s job.

use std::path::Path;
use std::time::Duration;

use tokio::time::Instant;

/// `/sys/class/net/X/type` of an Ethernet device (ARPHRD_ETHER); loopback, tunnels and
/// the like are not ours to configure.
const ARPHRD_ETHER: &str = "1";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub ifindex: u32,
    pub mac: [u8; 6],
}

impl Interface {
    pub fn mac_string(&self) -> String {
        format_mac(&self.mac)
    }
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.trim().split(':');
    for b in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

fn read_trimmed(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

/// The Ethernet interfaces under `sys_class_net`, sorted by name. Entries that cannot be
/// read are skipped: an interface that vanished while we looked is not an error.
pub fn list_interfaces(sys_class_net: &Path) -> std::io::Result<Vec<Interface>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(sys_class_net)? {
        let Ok(entry) = entry else { continue };
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        let dir = entry.path();
        if name == "lo" || read_trimmed(&dir.join("type")).as_deref() != Some(ARPHRD_ETHER) {
            continue;
        }
        let Some(ifindex) = read_trimmed(&dir.join("ifindex")).and_then(|s| s.parse().ok()) else {
            continue;
        };
        let Some(mac) = read_trimmed(&dir.join("address")).and_then(|s| parse_mac(&s)) else {
            continue;
        };
        out.push(Interface { name, ifindex, mac });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Reading `carrier` of a down interface fails with EINVAL: that is "no carrier".
pub fn has_carrier(sys_class_net: &Path, name: &str) -> bool {
    read_trimmed(&sys_class_net.join(name).join("carrier")).as_deref() == Some("1")
}

/// Polls for carrier until `timeout`; true once it is there.
pub async fn wait_for_carrier(sys_class_net: &Path, name: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if has_carrier(sys_class_net, name) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_if(root: &Path, name: &str, kind: &str, index: &str, mac: &str, carrier: Option<&str>) {
        let d = root.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("type"), format!("{kind}\n")).unwrap();
        std::fs::write(d.join("ifindex"), format!("{index}\n")).unwrap();
        std::fs::write(d.join("address"), format!("{mac}\n")).unwrap();
        if let Some(c) = carrier {
            std::fs::write(d.join("carrier"), format!("{c}\n")).unwrap();
        }
    }

    #[test]
    fn lists_ethernet_interfaces_sorted_and_skips_the_rest() {
        let t = tempfile::tempdir().unwrap();
        fake_if(t.path(), "lo", "772", "1", "00:00:00:00:00:00", Some("1"));
        fake_if(t.path(), "eth1", "1", "3", "52:54:00:00:00:02", None);
        fake_if(t.path(), "eth0", "1", "2", "52:54:00:00:00:01", Some("1"));
        fake_if(t.path(), "sit0", "776", "4", "00:00:00:00", None);
        fake_if(t.path(), "broken", "1", "x", "52:54:00:00:00:03", None);
        let l = list_interfaces(t.path()).unwrap();
        let names: Vec<_> = l.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["eth0", "eth1"]);
        assert_eq!(l[0].ifindex, 2);
        assert_eq!(l[0].mac_string(), "52:54:00:00:00:01");
        assert!(has_carrier(t.path(), "eth0"));
        assert!(!has_carrier(t.path(), "eth1"));
        assert!(!has_carrier(t.path(), "missing"));
    }

    #[test]
    fn macs() {
        assert_eq!(
            parse_mac("aa:bb:cc:dd:ee:0f"),
            Some([0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0x0f])
        );
        assert_eq!(parse_mac("aa:bb:cc:dd:ee"), None);
        assert_eq!(parse_mac("aa:bb:cc:dd:ee:ff:00"), None);
        assert_eq!(parse_mac("aa:bb:cc:dd:ee:fff"), None);
        assert_eq!(parse_mac("zz:bb:cc:dd:ee:ff"), None);
    }

    #[tokio::test]
    async fn carrier_wait_gives_up_at_the_deadline() {
        let t = tempfile::tempdir().unwrap();
        fake_if(t.path(), "eth0", "1", "2", "52:54:00:00:00:01", Some("0"));
        let start = Instant::now();
        assert!(!wait_for_carrier(t.path(), "eth0", Duration::from_millis(200)).await);
        assert!(start.elapsed() >= Duration::from_millis(200));
        std::fs::write(t.path().join("eth0/carrier"), "1\n").unwrap();
        assert!(wait_for_carrier(t.path(), "eth0", Duration::from_secs(5)).await);
    }
}

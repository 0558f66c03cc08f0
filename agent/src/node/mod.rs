//! What the node is and how it is doing: identity, capacity, usage, pressure and the
//! conditions derived from them. Read from /proc, /sys and /etc; no state of its own.

use std::fs;
use std::path::Path;

/// Node usage at one moment.
#[derive(Debug, Clone, Default)]
pub struct Usage {
    pub memory_used_bytes: u64,
    pub memory_available_bytes: u64,
    pub load: [f64; 3],
    pub cpu_busy_usec: u64,
    pub processes: u64,
    /// (some avg10, full avg10) for cpu, memory, io; None without PSI.
    pub pressure: [Option<(f64, f64)>; 3],
    pub disk_free_bytes: u64,
}

#[derive(Debug, Clone, Default)]
pub struct Identity {
    pub machine_id: String,
    pub hostname: String,
    pub macs: Vec<String>,
    pub addresses: Vec<String>,
}

fn read_trim(p: impl AsRef<Path>) -> String {
    fs::read_to_string(p)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

pub fn boot_id() -> String {
    read_trim("/proc/sys/kernel/random/boot_id")
}

pub fn kernel_release() -> String {
    read_trim("/proc/sys/kernel/osrelease")
}

pub fn uptime_seconds() -> f64 {
    read_trim("/proc/uptime")
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.0)
}

fn meminfo_kib(key: &str) -> u64 {
    fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                let rest = l.strip_prefix(key)?.strip_prefix(':')?;
                rest.split_whitespace().next()?.parse().ok()
            })
        })
        .unwrap_or(0)
}

pub fn memory_total_bytes() -> u64 {
    meminfo_kib("MemTotal") * 1024
}

pub fn cpu_count() -> u64 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u64)
        .unwrap_or(1)
}

pub fn pid_max() -> u64 {
    read_trim("/proc/sys/kernel/pid_max")
        .parse()
        .unwrap_or(32768)
}

pub fn identity() -> Identity {
    let mut machine_id = read_trim("/etc/machine-id");
    if machine_id.is_empty() {
        machine_id = read_trim("/sys/class/dmi/id/product_uuid");
    }
    let mut macs = Vec::new();
    if let Ok(dir) = fs::read_dir("/sys/class/net") {
        let mut names: Vec<_> = dir.filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
        names.sort();
        for n in names {
            if n == "lo" {
                continue;
            }
            let mac = read_trim(Path::new("/sys/class/net").join(&n).join("address"));
            if !mac.is_empty() && mac != "00:00:00:00:00:00" {
                macs.push(format!("{}={mac}", n.to_string_lossy()));
            }
        }
    }
    if machine_id.is_empty() {
        // An image without /etc/machine-id or DMI: the first MAC is stable across boots
        // and reimages, which is what the master keys a machine on.
        machine_id = macs
            .first()
            .and_then(|m| m.split_once('='))
            .map(|(_, mac)| format!("mac-{}", mac.replace(':', "")))
            .unwrap_or_default();
    }
    let addresses = nix::ifaddrs::getifaddrs()
        .map(|addrs| {
            addrs
                .filter(|a| a.interface_name != "lo")
                .filter_map(|a| {
                    let addr = a.address?;
                    if let Some(v4) = addr.as_sockaddr_in() {
                        Some(format!("{}={}", a.interface_name, v4.ip()))
                    } else {
                        addr.as_sockaddr_in6()
                            .map(|v6| format!("{}={}", a.interface_name, v6.ip()))
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    Identity {
        machine_id,
        hostname: nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default(),
        macs,
        addresses,
    }
}

fn pressure(resource: &str) -> Option<(f64, f64)> {
    let text = fs::read_to_string(Path::new("/proc/pressure").join(resource)).ok()?;
    let avg10 = |kind: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(kind))
            .and_then(|l| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix("avg10="))
                    .and_then(|v| v.parse().ok())
            })
            .unwrap_or(0.0)
    };
    Some((avg10("some"), avg10("full")))
}

fn cpu_busy_usec() -> u64 {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return 0;
    };
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal: busy = all but idle and iowait.
    let busy: u64 = ticks
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .take(8)
        .map(|(_, v)| *v)
        .sum();
    // USER_HZ is 100 on every Linux ABI celld runs on.
    busy * 10_000
}

pub fn usage(state_dir: &Path) -> Usage {
    let load_text = read_trim("/proc/loadavg");
    let mut fields = load_text.split_whitespace();
    let mut load = [0.0; 3];
    for l in load.iter_mut() {
        *l = fields.next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
    }
    let processes = fields
        .next()
        .and_then(|v| v.split_once('/'))
        .and_then(|(_, total)| total.parse().ok())
        .unwrap_or(0);
    let total = memory_total_bytes();
    let available = meminfo_kib("MemAvailable") * 1024;
    let disk_free_bytes = nix::sys::statvfs::statvfs(state_dir)
        .or_else(|_| nix::sys::statvfs::statvfs("/"))
        .map(|s| s.blocks_available() * s.fragment_size())
        .unwrap_or(0);
    Usage {
        memory_used_bytes: total.saturating_sub(available),
        memory_available_bytes: available,
        load,
        cpu_busy_usec: cpu_busy_usec(),
        processes,
        pressure: [pressure("cpu"), pressure("memory"), pressure("io")],
        disk_free_bytes,
    }
}

/// A node condition and why it holds.
#[derive(Debug, Clone, PartialEq)]
pub struct ConditionValue {
    pub kind: &'static str,
    pub status: bool,
    pub reason: String,
}

/// Ready, MemoryPressure, PIDPressure, DiskPressure from one usage reading.
pub fn conditions(u: &Usage, total_memory: u64, pid_max: u64) -> Vec<ConditionValue> {
    let mem_low = total_memory > 0 && u.memory_available_bytes < total_memory / 20;
    let mem_stall = u.pressure[1].is_some_and(|(_, full)| full > 10.0);
    let pid_high = pid_max > 0 && u.processes > pid_max * 9 / 10;
    let disk_low = u.disk_free_bytes < 256 << 20;
    vec![
        ConditionValue {
            kind: "Ready",
            status: true,
            reason: "celld is serving".into(),
        },
        ConditionValue {
            kind: "MemoryPressure",
            status: mem_low || mem_stall,
            reason: if mem_low {
                "less than 5% of memory available".into()
            } else if mem_stall {
                "memory PSI full avg10 above 10%".into()
            } else {
                "memory available".into()
            },
        },
        ConditionValue {
            kind: "PIDPressure",
            status: pid_high,
            reason: format!("{} of {} pids in use", u.processes, pid_max),
        },
        ConditionValue {
            kind: "DiskPressure",
            status: disk_low,
            reason: format!("{} bytes free for celld state", u.disk_free_bytes),
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_host_reports_plausible_numbers() {
        assert!(memory_total_bytes() > 0);
        assert!(cpu_count() >= 1);
        assert!(!boot_id().is_empty());
        let u = usage(Path::new("/"));
        assert!(u.memory_available_bytes > 0);
        assert!(u.processes > 0);
    }

    #[test]
    fn low_memory_is_pressure() {
        let u = Usage {
            memory_available_bytes: 10,
            disk_free_bytes: 1 << 40,
            ..Default::default()
        };
        let c = conditions(&u, 1 << 30, 1000);
        assert!(c.iter().any(|c| c.kind == "MemoryPressure" && c.status));
        assert!(c.iter().any(|c| c.kind == "DiskPressure" && !c.status));
    }
}

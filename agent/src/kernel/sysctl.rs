//! Sysctls: names checked (dotted lowercase words, resolved under /proc/sys only),
//! applied one by one, each reported with what was wanted, what the kernel now says, and
//! the error if any.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("sysctl name {0:?} is not valid: use dotted words of [a-z0-9_-] such as vm.swappiness")]
pub struct BadSysctlKey(pub String);

/// One sysctl after an attempt to apply it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysctlResult {
    pub key: String,
    pub wanted: String,
    pub actual: String,
    pub error: String,
}

pub fn check_sysctl_key(key: &str) -> Result<(), BadSysctlKey> {
    let ok = !key.is_empty()
        && key.len() <= 256
        && key.split('.').all(|w| {
            !w.is_empty()
                && w.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(BadSysctlKey(key.to_string()))
    }
}

/// `vm.swappiness` -> `<root>/vm/swappiness`. Only checked keys reach here, so the path
/// cannot leave `root`.
fn key_path(root: &Path, key: &str) -> PathBuf {
    key.split('.').fold(root.to_path_buf(), |p, w| p.join(w))
}

fn check_value(value: &str) -> Result<(), String> {
    if value.len() > 4096 || value.contains('\0') || value.contains('\n') {
        return Err("value must be one line of at most 4096 bytes".into());
    }
    Ok(())
}

/// Applies each sysctl under `root` (normally /proc/sys) and reports each.
pub fn apply_sysctls(root: &Path, wanted: &BTreeMap<String, String>) -> Vec<SysctlResult> {
    wanted
        .iter()
        .map(|(key, value)| {
            let mut r = SysctlResult {
                key: key.clone(),
                wanted: value.clone(),
                actual: String::new(),
                error: String::new(),
            };
            if let Err(e) = check_sysctl_key(key) {
                r.error = e.to_string();
                return r;
            }
            if let Err(e) = check_value(value) {
                r.error = e;
                return r;
            }
            let path = key_path(root, key);
            // Never create: a name the kernel lacks must fail, not make a file.
            let written = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|mut f| std::io::Write::write_all(&mut f, value.as_bytes()));
            if let Err(e) = written {
                r.error = match e.kind() {
                    std::io::ErrorKind::NotFound => {
                        format!("no such sysctl on this kernel ({})", path.display())
                    }
                    _ => format!("writing {}: {e}", path.display()),
                };
            }
            r.actual = std::fs::read_to_string(&path)
                .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
                .unwrap_or_default();
            tracing::debug!(key = %r.key, wanted = %r.wanted, actual = %r.actual, error = %r.error, "sysctl");
            r
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cannot_leave_proc_sys() {
        for bad in [
            "",
            "..",
            "vm..x",
            "vm/../x",
            "/etc/passwd",
            "Vm.x",
            "vm.",
            "a b",
        ] {
            assert!(check_sysctl_key(bad).is_err(), "{bad:?}");
        }
        check_sysctl_key("net.ipv4.ip_forward").unwrap();
        check_sysctl_key("net.ipv4.conf.eth0-1.rp_filter").unwrap();
    }

    #[test]
    fn each_sysctl_is_reported_on_its_own() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("vm")).unwrap();
        std::fs::write(dir.path().join("vm/swappiness"), "60\n").unwrap();
        let wanted = BTreeMap::from([
            ("vm.swappiness".to_string(), "10".to_string()),
            ("vm.nonexistent".to_string(), "1".to_string()),
            ("x/../../y".to_string(), "1".to_string()),
        ]);
        let results = apply_sysctls(dir.path(), &wanted);
        let by_key: BTreeMap<_, _> = results.iter().map(|r| (r.key.as_str(), r)).collect();
        assert_eq!(by_key["vm.swappiness"].actual, "10");
        assert!(by_key["vm.swappiness"].error.is_empty());
        assert!(by_key["vm.nonexistent"].error.contains("no such sysctl"));
        assert!(by_key["x/../../y"].error.contains("not valid"));
    }
}

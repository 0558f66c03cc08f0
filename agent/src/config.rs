//! Node configuration: defaults < the config file (TOML) < `celld.*=` keys on the kernel
//! command line. Pure parsing, no I/O: callers read the files and pass strings.
//!
//! A bad value never stops the node: it is reported (console, status) and the earlier
//! value is kept.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use crate::kernel::sysctl::check_sysctl_key;

#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// gRPC listen address.
    pub listen: String,
    /// Logs and other state of celld.
    pub state_dir: PathBuf,
    /// Empty: keep the node's (daemon) or derive from the first MAC (PID 1).
    pub hostname: String,
    pub image_version: String,
    /// host:port of the master to register with; empty for none.
    pub master: String,
    /// Parent cgroup of every task.
    pub cgroup_parent: String,
    /// Memory and CPU kept back for the system and celld itself.
    pub reserved_memory_bytes: u64,
    pub reserved_cpu_millis: u64,
    pub sysctls: BTreeMap<String, String>,
    /// Labels the master's constraints match against (zone, rack, ...).
    pub labels: BTreeMap<String, String>,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:7100".into(),
            state_dir: "/var/lib/celld".into(),
            hostname: String::new(),
            image_version: String::new(),
            master: String::new(),
            cgroup_parent: "celld".into(),
            reserved_memory_bytes: 128 << 20,
            reserved_cpu_millis: 100,
            sysctls: BTreeMap::new(),
            labels: BTreeMap::new(),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("node config: {0}")]
    Toml(String),
    #[error("node config: {field}: {problem}")]
    Field { field: String, problem: String },
}

impl NodeConfig {
    /// Parses a config file's text on top of the defaults and checks every field.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let cfg: NodeConfig = toml::from_str(text).map_err(|e| ConfigError::Toml(e.to_string()))?;
        cfg.check()?;
        Ok(cfg)
    }

    pub fn check(&self) -> Result<(), ConfigError> {
        let bad = |field: &str, problem: String| ConfigError::Field {
            field: field.into(),
            problem,
        };
        self.listen.parse::<SocketAddr>().map_err(|_| {
            bad(
                "listen",
                format!("{:?} is not an address like 0.0.0.0:7100", self.listen),
            )
        })?;
        if !self.state_dir.is_absolute() {
            return Err(bad("state_dir", "must be an absolute path".into()));
        }
        crate::task::spec::check_name("cgroup_parent", &self.cgroup_parent)
            .map_err(|e| bad("cgroup_parent", e.problem))?;
        let host_ok = self.hostname.len() <= 63
            && self
                .hostname
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
        if !host_ok {
            return Err(bad(
                "hostname",
                format!("{:?}: use [A-Za-z0-9.-], at most 63", self.hostname),
            ));
        }
        if !self.master.is_empty() {
            let ok = self
                .master
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !ok {
                return Err(bad(
                    "master",
                    format!("{:?} is not host:port like 10.0.0.1:7000", self.master),
                ));
            }
        }
        for (k, v) in &self.labels {
            let ok = |s: &str| {
                !s.is_empty()
                    && s.len() <= 63
                    && s.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            };
            if !ok(k) || !ok(v) {
                return Err(bad(
                    &format!("labels.{k}"),
                    "keys and values are [A-Za-z0-9._-], 1 to 63 characters".into(),
                ));
            }
        }
        for key in self.sysctls.keys() {
            check_sysctl_key(key).map_err(|e| bad(&format!("sysctls.{key}"), e.to_string()))?;
        }
        Ok(())
    }

    /// Applies `celld.<key>=<value>` words of a kernel command line. Returns one message
    /// per word that was refused; the rest still apply.
    pub fn apply_cmdline(&mut self, cmdline: &str) -> Vec<String> {
        let mut errors = Vec::new();
        for word in cmdline.split_whitespace() {
            let Some(kv) = word.strip_prefix("celld.") else {
                continue;
            };
            let Some((key, value)) = kv.split_once('=') else {
                errors.push(format!("kernel command line: {word:?} has no '=value'"));
                continue;
            };
            let mut next = self.clone();
            match key {
                "listen" => next.listen = value.into(),
                "hostname" => next.hostname = value.into(),
                "image_version" => next.image_version = value.into(),
                "master" => next.master = value.into(),
                "state_dir" => next.state_dir = value.into(),
                "reserved_memory_bytes" | "reserved_cpu_millis" => {
                    let Ok(n) = value.parse::<u64>() else {
                        errors.push(format!(
                            "kernel command line: celld.{key}={value:?} is not a number"
                        ));
                        continue;
                    };
                    if key == "reserved_memory_bytes" {
                        next.reserved_memory_bytes = n;
                    } else {
                        next.reserved_cpu_millis = n;
                    }
                }
                k if k.starts_with("label.") => {
                    next.labels
                        .insert(k["label.".len()..].to_string(), value.to_string());
                }
                k if k.starts_with("sysctl.") => {
                    next.sysctls
                        .insert(k["sysctl.".len()..].to_string(), value.to_string());
                }
                _ => {
                    errors.push(format!(
                        "kernel command line: celld.{key} is not a setting (known: listen, \
                         hostname, image_version, master, state_dir, reserved_memory_bytes, \
                         reserved_cpu_millis, sysctl.<key>, label.<key>)"
                    ));
                    continue;
                }
            }
            match next.check() {
                Ok(()) => *self = next,
                Err(e) => errors.push(format!("kernel command line: {word}: {e}")),
            }
        }
        errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_overrides_defaults() {
        let c = NodeConfig::from_toml(
            "listen = \"127.0.0.1:7200\"\n[sysctls]\n\"vm.swappiness\" = \"10\"\n",
        )
        .unwrap();
        assert_eq!(c.listen, "127.0.0.1:7200");
        assert_eq!(c.sysctls["vm.swappiness"], "10");
        assert_eq!(c.cgroup_parent, "celld");
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_field() {
        let e = NodeConfig::from_toml("lisen = \"x\"").unwrap_err();
        assert!(e.to_string().contains("lisen"), "{e}");
        let e = NodeConfig::from_toml("listen = \"nowhere\"").unwrap_err();
        assert!(e.to_string().contains("listen"), "{e}");
        let e = NodeConfig::from_toml("[sysctls]\n\"../../etc/passwd\" = \"1\"").unwrap_err();
        assert!(e.to_string().contains("sysctls."), "{e}");
        let e = NodeConfig::from_toml("reserved_cpu_millis = -1").unwrap_err();
        assert!(e.to_string().contains("reserved_cpu_millis"), "{e}");
    }

    #[test]
    fn command_line_wins_and_bad_words_keep_the_old_value() {
        let mut c = NodeConfig::default();
        let errors = c.apply_cmdline(
            "console=ttyS0 celld.hostname=n1 celld.listen=garbage celld.sysctl.vm.swappiness=5 \
             celld.bogus=1 celld.reserved_cpu_millis=x quiet",
        );
        assert_eq!(c.hostname, "n1");
        assert_eq!(c.listen, "0.0.0.0:7100");
        assert_eq!(c.sysctls["vm.swappiness"], "5");
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(errors.iter().any(|e| e.contains("listen")));
        assert!(errors.iter().any(|e| e.contains("bogus")));
        let more =
            c.apply_cmdline("celld.master=10.0.0.1:7000 celld.label.zone=a celld.master=nope");
        assert_eq!(c.master, "10.0.0.1:7000");
        assert_eq!(c.labels["zone"], "a");
        assert_eq!(more.len(), 1, "{more:?}");
    }
}

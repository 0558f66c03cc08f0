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
    /// The master's ed25519 public key, 64 lowercase hex characters: the only signer of
    /// image manifests this node reimages into. Empty: Reimage is refused.
    pub master_key: String,
    /// Largest kernel or initramfs a reimage downloads (each), in bytes.
    pub reimage_max_bytes: u64,
    /// A reimage download that receives nothing for this long is abandoned.
    pub reimage_stall_ms: u64,
    /// Join token for the first registration (`celld.join=`, from `cellmaster token
    /// create`).
    pub join: String,
    /// SHA-256 of the cell CA's certificate, 64 hex (`celld.ca=`): how the node knows
    /// its master before it has a certificate of its own.
    pub ca: String,
    /// Plain text, no certificates, no roles (`celld.insecure=1`, `--insecure`):
    /// development only.
    pub insecure: bool,
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
            master_key: String::new(),
            reimage_max_bytes: 128 << 20,
            reimage_stall_ms: 10_000,
            join: String::new(),
            ca: String::new(),
            insecure: false,
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
        if !self.ca.is_empty()
            && (self.ca.len() != 64 || !self.ca.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(bad(
                "ca",
                format!("{:?} is not a SHA-256 fingerprint (64 hex digits)", self.ca),
            ));
        }
        if self.join.len() > 128 || self.join.bytes().any(|b| !b.is_ascii_graphic()) {
            return Err(bad(
                "join",
                "not a join token (printable, at most 128)".into(),
            ));
        }
        if !self.master_key.is_empty() {
            parse_master_key(&self.master_key).map_err(|problem| bad("master_key", problem))?;
        }
        if self.reimage_max_bytes == 0 {
            return Err(bad("reimage_max_bytes", "must be above 0".into()));
        }
        if !(1..=600_000).contains(&self.reimage_stall_ms) {
            return Err(bad(
                "reimage_stall_ms",
                "must be 1 to 600000 (ten minutes)".into(),
            ));
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
                "master_key" => next.master_key = value.into(),
                "join" => next.join = value.into(),
                "ca" => next.ca = value.into(),
                "insecure" => match value {
                    "1" | "true" => next.insecure = true,
                    "0" | "false" => next.insecure = false,
                    _ => {
                        errors.push(format!(
                            "kernel command line: celld.insecure={value:?}: use 1 or 0"
                        ));
                        continue;
                    }
                },
                "reserved_memory_bytes"
                | "reserved_cpu_millis"
                | "reimage_max_bytes"
                | "reimage_stall_ms" => {
                    let Ok(n) = value.parse::<u64>() else {
                        errors.push(format!(
                            "kernel command line: celld.{key}={value:?} is not a number"
                        ));
                        continue;
                    };
                    let slot = match key {
                        "reserved_memory_bytes" => &mut next.reserved_memory_bytes,
                        "reserved_cpu_millis" => &mut next.reserved_cpu_millis,
                        "reimage_max_bytes" => &mut next.reimage_max_bytes,
                        _ => &mut next.reimage_stall_ms,
                    };
                    *slot = n;
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
                         hostname, image_version, master, master_key, join, ca, insecure, state_dir, \
                         reserved_memory_bytes, reserved_cpu_millis, reimage_max_bytes, \
                         reimage_stall_ms, sysctl.<key>, label.<key>)"
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

/// The master's public key from its hex form (64 lowercase hex characters).
pub fn parse_master_key(hex: &str) -> Result<ed25519_dalek::VerifyingKey, String> {
    let ok = hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    let bytes = match (ok, decode_hex(hex)) {
        (true, Some(b)) => b,
        _ => {
            return Err(format!(
                "{hex:?} is not an ed25519 public key: give 64 lowercase hex characters (32 bytes)"
            ));
        }
    };
    let mut key = [0u8; 32];
    key.copy_from_slice(&bytes);
    ed25519_dalek::VerifyingKey::from_bytes(&key)
        .map_err(|_| format!("{hex:?} is 32 bytes but not a valid ed25519 public key"))
}

/// Lowercase or uppercase hex to bytes; None on an odd length or a non-hex character.
pub fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    hex.as_bytes()
        .chunks(2)
        .map(|pair| {
            let pair = std::str::from_utf8(pair).ok().filter(|p| p.len() == 2)?;
            u8::from_str_radix(pair, 16).ok()
        })
        .collect()
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

    #[test]
    fn master_key_and_reimage_limits_are_checked_by_name() {
        // The ed25519 public key of the all-zero secret key (RFC 8032 test vector 1's
        // key is different; any valid point does).
        let key = "3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29";
        let c = NodeConfig::from_toml(&format!(
            "master_key = \"{key}\"\nreimage_max_bytes = 1000\nreimage_stall_ms = 50\n"
        ))
        .unwrap();
        assert_eq!(c.master_key, key);
        assert_eq!((c.reimage_max_bytes, c.reimage_stall_ms), (1000, 50));
        for bad in [
            "master_key = \"abc\"",
            "master_key = \"3B6A27BCCEB6A42D62A3A8D02A6F0D73653215771DE243A63AC048A18B59DA29\"",
        ] {
            let e = NodeConfig::from_toml(bad).unwrap_err();
            assert!(e.to_string().contains("master_key"), "{e}");
        }
        let e = NodeConfig::from_toml("reimage_max_bytes = 0").unwrap_err();
        assert!(e.to_string().contains("reimage_max_bytes"), "{e}");
        let mut c = NodeConfig::default();
        let errors = c.apply_cmdline(&format!(
            "celld.master_key={key} celld.reimage_stall_ms=x celld.reimage_max_bytes=4096 \
             celld.master_key=zz"
        ));
        assert_eq!(c.master_key, key);
        assert_eq!(c.reimage_max_bytes, 4096);
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors.iter().any(|e| e.contains("reimage_stall_ms")));
        assert!(errors.iter().any(|e| e.contains("master_key")));
    }
}

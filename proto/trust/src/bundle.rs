//! Client bundles, what `cellmaster admin-cert` writes for a person (like a kubeconfig or
//! a talosconfig): the master's address, the cell CA, a certificate naming a role, and its
//! key, in one TOML file of mode 0600. The CLI reads it to call the master, and a tool
//! with an operator or admin bundle can call a node directly.

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::{ClientTls, Credentials};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bundle {
    /// host:port of the master's gRPC; may be empty.
    #[serde(default)]
    pub master: String,
    /// The role its certificate names, for people reading the file.
    pub role: String,
    pub ca: String,
    pub cert: String,
    pub key: String,
}

impl Bundle {
    /// Reads a bundle; errors name the file.
    pub fn read(path: &Path) -> Result<Bundle, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn to_toml(&self) -> Result<String, String> {
        toml::to_string(self).map_err(|e| format!("bundle: {e}"))
    }

    pub fn credentials(&self) -> Credentials {
        Credentials {
            ca_pem: self.ca.clone(),
            cert_pem: self.cert.clone(),
            key_pem: self.key.clone(),
        }
    }

    /// TLS to a server whose certificate names `server_name` (`cellmaster`, or a node id).
    pub fn client_tls(&self, server_name: &str) -> Result<ClientTls, String> {
        let config = self.credentials().client_config()?;
        ClientTls::new(Arc::new(config), server_name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bundle_reads_back_and_unknown_keys_are_refused() {
        let dir = std::env::temp_dir().join(format!("celld-bundle-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let b = Bundle {
            master: "10.0.0.1:7000".into(),
            role: "reader".into(),
            ca: "ca".into(),
            cert: "cert".into(),
            key: "key".into(),
        };
        let path = dir.join("ok.bundle");
        std::fs::write(&path, b.to_toml().unwrap()).unwrap();
        let back = Bundle::read(&path).unwrap();
        assert_eq!((&back.master, &back.key), (&b.master, &b.key));
        let odd = dir.join("odd.bundle");
        std::fs::write(&odd, b.to_toml().unwrap() + "colour = \"red\"\n").unwrap();
        let e = Bundle::read(&odd).unwrap_err();
        assert!(e.contains("odd.bundle") && e.contains("colour"), "{e}");
        let e = Bundle::read(&dir.join("absent")).unwrap_err();
        assert!(e.contains("absent"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! The nodes the master knows: who registered, from where, with what, and what the last
//! poll said. The store keeps the durable part (identity, address, cordon); a restarted
//! master loads it from there with [`Registry::load`] and polls every node at once.

use std::collections::BTreeMap;
use std::net::IpAddr;

use celld_proto::v1 as pb;

use crate::poll::{Fleet, Liveness, NodeHealth};
use crate::store::NodeRow;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegisterError {
    #[error("{field}: {problem}")]
    Invalid {
        field: &'static str,
        problem: String,
    },
    #[error("node id {id} belongs to machine {owner}; machine {claimant} cannot take it")]
    Impostor {
        id: String,
        owner: String,
        claimant: String,
    },
}

/// What a node told the master about itself.
#[derive(Debug, Clone, Default)]
pub struct NodeRecord {
    pub machine_id: String,
    pub boot_id: String,
    pub image_version: String,
    pub celld_version: String,
    pub labels: BTreeMap<String, String>,
    pub allocatable: Option<pb::Resources>,
    pub tasks: u32,
    /// Cordoned by the master (stored).
    pub cordoned: bool,
    /// Cordoned or draining by the node itself (an operator talked to it directly).
    pub node_cordoned: bool,
    /// From the last full status.
    pub conditions: Vec<pb::Condition>,
}

/// A registration that was accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    pub id: String,
    /// Where to poll.
    pub address: String,
    /// The boot id the master knew before, when this is another boot of a known node:
    /// whatever the master had placed there is gone.
    pub rebooted_from: Option<String>,
}

#[derive(Default)]
pub struct Registry {
    pub records: BTreeMap<String, NodeRecord>,
}

/// A node id: `[A-Za-z0-9.-]`, 1 to 63 characters (a hostname).
pub fn valid_node_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

impl Registry {
    /// The nodes of a restarted master, from its store: each is polled again from New.
    pub fn load(&mut self, fleet: &Fleet, nodes: &[NodeRow]) {
        let mut fleet = fleet.lock().unwrap_or_else(|p| p.into_inner());
        for n in nodes {
            self.records.insert(
                n.id.clone(),
                NodeRecord {
                    machine_id: n.machine_id.clone(),
                    boot_id: n.boot_id.clone(),
                    image_version: n.image_version.clone(),
                    labels: n.labels.clone(),
                    allocatable: Some(crate::control::pb_resources(n.allocatable)),
                    cordoned: n.cordoned,
                    ..Default::default()
                },
            );
            fleet.insert(n.id.clone(), NodeHealth::new(n.address.clone()));
        }
    }

    /// Checks a registration and records it; the node's id is its hostname.
    pub fn register(
        &mut self,
        fleet: &Fleet,
        req: &pb::RegisterRequest,
        peer: IpAddr,
    ) -> Result<Registered, RegisterError> {
        let invalid = |field, problem: &str| RegisterError::Invalid {
            field,
            problem: problem.to_string(),
        };
        let identity = req
            .identity
            .as_ref()
            .ok_or_else(|| invalid("identity", "is required"))?;
        if identity.machine_id.is_empty() || identity.machine_id.len() > 128 {
            return Err(invalid("identity.machine_id", "1 to 128 characters"));
        }
        if !valid_node_id(&identity.hostname) {
            return Err(invalid(
                "identity.hostname",
                "[A-Za-z0-9.-], 1 to 63 characters",
            ));
        }
        if req.boot_id.is_empty() {
            return Err(invalid("boot_id", "is required"));
        }
        let port = u16::try_from(req.grpc_port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| invalid("grpc_port", "must be 1..=65535"))?;
        let id = identity.hostname.clone();
        // A node listed in the master's config has no owner until its first registration.
        if let Some(existing) = self.records.get(&id)
            && !existing.machine_id.is_empty()
            && existing.machine_id != identity.machine_id
        {
            return Err(RegisterError::Impostor {
                id,
                owner: existing.machine_id.clone(),
                claimant: identity.machine_id.clone(),
            });
        }
        let address = match peer {
            IpAddr::V6(v6) => format!("[{v6}]:{port}"),
            IpAddr::V4(v4) => format!("{v4}:{port}"),
        };
        let record = self.records.entry(id.clone()).or_default();
        let rebooted_from = (!record.boot_id.is_empty() && record.boot_id != req.boot_id)
            .then(|| record.boot_id.clone());
        record.machine_id = identity.machine_id.clone();
        record.boot_id = req.boot_id.clone();
        record.image_version = req.image_version.clone();
        record.celld_version = req.celld_version.clone();
        record.labels = req.labels.clone().into_iter().collect();
        record.allocatable = req.allocatable;
        let mut fleet = fleet.lock().unwrap_or_else(|p| p.into_inner());
        let health = fleet
            .entry(id.clone())
            .or_insert_with(|| NodeHealth::new(address.clone()));
        health.address = address.clone();
        Ok(Registered {
            id,
            address,
            rebooted_from,
        })
    }

    /// Folds a node's full status into its record.
    pub fn apply(&mut self, id: &str, s: &pb::NodeStatus) {
        if let Some(r) = self.records.get_mut(id) {
            r.boot_id = s.boot_id.clone();
            r.image_version = s.image_version.clone();
            r.tasks = s.tasks.len() as u32;
            r.node_cordoned = s.cordoned || s.draining;
            r.allocatable = s.allocatable;
            r.conditions = s.conditions.clone();
        }
    }

    pub fn summaries(&self, fleet: &Fleet) -> Vec<pb::NodeSummary> {
        let fleet = fleet.lock().unwrap_or_else(|p| p.into_inner());
        self.records
            .iter()
            .map(|(id, r)| {
                let h = fleet.get(id);
                pb::NodeSummary {
                    id: id.clone(),
                    address: h.map(|h| h.address.clone()).unwrap_or_default(),
                    liveness: match h.map(|h| h.liveness) {
                        Some(Liveness::Ready) => "READY",
                        Some(Liveness::Unknown) => "UNKNOWN",
                        Some(Liveness::Down) => "DOWN",
                        _ => "NEW",
                    }
                    .into(),
                    machine_id: r.machine_id.clone(),
                    boot_id: r.boot_id.clone(),
                    image_version: r.image_version.clone(),
                    celld_version: r.celld_version.clone(),
                    labels: r.labels.clone().into_iter().collect(),
                    allocatable: r.allocatable,
                    tasks: r.tasks,
                    cordoned: r.cordoned || r.node_cordoned,
                    missed_polls: h.map(|h| h.missed).unwrap_or(0),
                    last_reply_ms_ago: h
                        .and_then(|h| h.last_reply)
                        .map(|t| t.elapsed().as_millis() as u64)
                        .unwrap_or(0),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn req(host: &str, machine: &str) -> pb::RegisterRequest {
        pb::RegisterRequest {
            identity: Some(pb::NodeIdentity {
                machine_id: machine.into(),
                hostname: host.into(),
                ..Default::default()
            }),
            boot_id: "b1".into(),
            grpc_port: 7100,
            ..Default::default()
        }
    }

    #[test]
    fn a_node_registers_and_is_polled_at_its_peer_address() {
        let fleet: Fleet = Arc::new(Mutex::new(BTreeMap::new()));
        let mut r = Registry::default();
        let reg = r
            .register(&fleet, &req("n1", "m1"), "10.0.0.5".parse().unwrap())
            .unwrap();
        assert_eq!(
            (reg.id.as_str(), reg.address.as_str()),
            ("n1", "10.0.0.5:7100")
        );
        assert_eq!(reg.rebooted_from, None);
        assert!(fleet.lock().unwrap().contains_key("n1"));
        // Same machine again, same boot (celld restarted its registration): fine.
        let again = r
            .register(&fleet, &req("n1", "m1"), "10.0.0.6".parse().unwrap())
            .unwrap();
        assert_eq!(again.rebooted_from, None);
        assert_eq!(fleet.lock().unwrap()["n1"].address, "10.0.0.6:7100");
        // Another boot: the master hears which one it replaces.
        let mut q = req("n1", "m1");
        q.boot_id = "b2".into();
        let reboot = r.register(&fleet, &q, "10.0.0.6".parse().unwrap()).unwrap();
        assert_eq!(reboot.rebooted_from.as_deref(), Some("b1"));
    }

    #[test]
    fn a_loaded_node_keeps_its_owner_and_cordon() {
        let fleet: Fleet = Arc::new(Mutex::new(BTreeMap::new()));
        let mut r = Registry::default();
        let row = NodeRow {
            id: "n1".into(),
            machine_id: "m1".into(),
            address: "10.0.0.5:7100".into(),
            cordoned: true,
            boot_id: "b1".into(),
            ..Default::default()
        };
        r.load(&fleet, &[row]);
        assert!(r.records["n1"].cordoned);
        assert_eq!(fleet.lock().unwrap()["n1"].liveness, Liveness::New);
        let e = r
            .register(&fleet, &req("n1", "m2"), "10.0.0.9".parse().unwrap())
            .unwrap_err();
        assert!(matches!(e, RegisterError::Impostor { .. }), "{e}");
    }

    #[test]
    fn another_machine_cannot_take_a_node_id() {
        let fleet: Fleet = Arc::new(Mutex::new(BTreeMap::new()));
        let mut r = Registry::default();
        r.register(&fleet, &req("n1", "m1"), "10.0.0.5".parse().unwrap())
            .unwrap();
        let e = r
            .register(&fleet, &req("n1", "m2"), "10.0.0.9".parse().unwrap())
            .unwrap_err();
        assert!(matches!(e, RegisterError::Impostor { .. }), "{e}");
        assert_eq!(fleet.lock().unwrap()["n1"].address, "10.0.0.5:7100");
    }

    #[test]
    fn bad_registrations_name_the_field() {
        let fleet: Fleet = Arc::new(Mutex::new(BTreeMap::new()));
        let mut r = Registry::default();
        let peer: IpAddr = "10.0.0.5".parse().unwrap();
        let mut q = req("n1", "m1");
        q.grpc_port = 70000;
        assert!(
            r.register(&fleet, &q, peer)
                .unwrap_err()
                .to_string()
                .starts_with("grpc_port")
        );
        let q = req("../x", "m1");
        assert!(
            r.register(&fleet, &q, peer)
                .unwrap_err()
                .to_string()
                .starts_with("identity.hostname")
        );
        let mut q = req("n1", "m1");
        q.identity = None;
        assert!(
            r.register(&fleet, &q, peer)
                .unwrap_err()
                .to_string()
                .starts_with("identity")
        );
        assert!(fleet.lock().unwrap().is_empty());
    }
}

//! Roles live in certificates: the subject's organization is `celld:<role>` and its common
//! name the holder's name (a node id, an operator's name). Every gRPC method needs a role;
//! this module is the one table of which.

use std::fmt;

/// The organization prefix that marks a role in a certificate's subject.
pub const ORG_PREFIX: &str = "celld:";

/// Who holds a certificate of the cell CA.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// May look: status, task lists, logs.
    Reader,
    /// Adds running, killing, cordoning and draining tasks and nodes.
    Operator,
    /// Adds reimaging, rebooting, sysctls, images, rollouts and join tokens.
    Admin,
    /// A node: may only renew its own certificate at the master. Never a caller of nodes.
    Node,
    /// The master calling nodes: everything an admin may do there.
    Master,
}

impl Role {
    /// The roles `cellmaster admin-cert` hands to people.
    pub const FOR_PEOPLE: [Role; 3] = [Role::Reader, Role::Operator, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Operator => "operator",
            Role::Admin => "admin",
            Role::Node => "node",
            Role::Master => "master",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        [
            Role::Reader,
            Role::Operator,
            Role::Admin,
            Role::Node,
            Role::Master,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
    }

    /// How much a holder may do when calling a node or the master's operator API.
    /// Nodes rank 0: a node's certificate opens nothing but its own renewal.
    fn rank(self) -> u8 {
        match self {
            Role::Node => 0,
            Role::Reader => 1,
            Role::Operator => 2,
            Role::Admin | Role::Master => 3,
        }
    }

    /// Whether a holder of `self` may make a call that needs `needed`.
    pub fn allows(self, needed: Role) -> bool {
        needed.rank() > 0 && self.rank() >= needed.rank()
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a call asks of its caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// Anyone who completes the TLS handshake: the gRPC health check.
    Nothing,
    /// A certificate with at least this role.
    Role(Role),
    /// `Register`: a join token or the node's own certificate, which the handler checks.
    Registration,
}

const HEALTH: &str = "/grpc.health.v1.Health/";
const REFLECTION: &str = "/grpc.reflection.";

/// What a call to celld needs. Unknown paths need admin (they end Unimplemented anyway).
pub fn node_api(path: &str) -> Need {
    if path.starts_with(HEALTH) {
        return Need::Nothing;
    }
    if path.starts_with(REFLECTION) {
        return Need::Role(Role::Reader);
    }
    let method = path.strip_prefix("/celld.v1.Node/").unwrap_or("");
    Need::Role(match method {
        "GetStatus" | "ListTasks" | "WatchTasks" | "TaskLogs" => Role::Reader,
        "RunTask" | "KillTask" | "Cordon" | "Uncordon" | "Drain" => Role::Operator,
        _ => Role::Admin,
    })
}

/// What a call to cellmaster needs.
pub fn master_api(path: &str) -> Need {
    if path.starts_with(HEALTH) {
        return Need::Nothing;
    }
    if path.starts_with(REFLECTION) {
        return Need::Role(Role::Reader);
    }
    let method = path.strip_prefix("/celld.v1.Master/").unwrap_or("");
    match method {
        "Register" => Need::Registration,
        "ListNodes" | "ListCellTasks" | "ListJobs" | "DescribeNode" | "DescribeJob"
        | "DescribeTask" | "CellTaskLogs" | "ListImages" | "GetRollout" => Need::Role(Role::Reader),
        "SubmitJob" | "Kill" | "SetCordon" | "DrainNode" => Need::Role(Role::Operator),
        _ => Need::Role(Role::Admin),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_nest_and_nodes_call_nothing() {
        assert!(Role::Admin.allows(Role::Reader));
        assert!(Role::Operator.allows(Role::Operator));
        assert!(!Role::Reader.allows(Role::Operator));
        assert!(!Role::Operator.allows(Role::Admin));
        assert!(Role::Master.allows(Role::Admin));
        for needed in [Role::Reader, Role::Operator, Role::Admin] {
            assert!(!Role::Node.allows(needed));
        }
        assert!(!Role::Admin.allows(Role::Node));
        for r in [
            Role::Reader,
            Role::Operator,
            Role::Admin,
            Role::Node,
            Role::Master,
        ] {
            assert_eq!(Role::parse(r.as_str()), Some(r));
        }
        assert_eq!(Role::parse("root"), None);
    }

    #[test]
    fn the_issue_s_table_of_node_calls() {
        let needs = |m: &str| node_api(&format!("/celld.v1.Node/{m}"));
        for m in ["GetStatus", "ListTasks", "WatchTasks", "TaskLogs"] {
            assert_eq!(needs(m), Need::Role(Role::Reader), "{m}");
        }
        for m in ["RunTask", "KillTask", "Cordon", "Uncordon", "Drain"] {
            assert_eq!(needs(m), Need::Role(Role::Operator), "{m}");
        }
        for m in ["Reimage", "Reboot", "Poweroff", "ApplySysctls", "Unheard"] {
            assert_eq!(needs(m), Need::Role(Role::Admin), "{m}");
        }
        assert_eq!(node_api("/grpc.health.v1.Health/Check"), Need::Nothing);
        assert_eq!(
            node_api("/other.Service/GetStatus"),
            Need::Role(Role::Admin)
        );
    }

    #[test]
    fn master_calls() {
        let needs = |m: &str| master_api(&format!("/celld.v1.Master/{m}"));
        assert_eq!(needs("Register"), Need::Registration);
        assert_eq!(needs("ListNodes"), Need::Role(Role::Reader));
        assert_eq!(needs("SubmitJob"), Need::Role(Role::Operator));
        assert_eq!(needs("StartRollout"), Need::Role(Role::Admin));
        assert_eq!(needs("CreateJoinToken"), Need::Role(Role::Admin));
    }
}

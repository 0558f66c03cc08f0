//! The part of a `NodeStatus` the master uses, decoded on its own: the fields of
//! `celld.v1.NodeStatus` with the same numbers, and of each task only what reconciliation
//! reads. Everything else in a reply (each task's transitions, usage and resources, the
//! node's usage and sysctls) is skipped by the decoder without being allocated, which
//! is most of what a full reply of 100 tasks costs to decode and free.

use celld_proto::v1 as pb;

#[derive(Clone, PartialEq, prost::Message)]
pub struct LiteStatus {
    #[prost(uint64, tag = "1")]
    pub generation: u64,
    #[prost(message, optional, tag = "2")]
    pub identity: Option<pb::NodeIdentity>,
    #[prost(string, tag = "3")]
    pub boot_id: String,
    #[prost(string, tag = "4")]
    pub image_version: String,
    #[prost(string, tag = "5")]
    pub celld_version: String,
    #[prost(message, optional, tag = "10")]
    pub allocatable: Option<pb::Resources>,
    #[prost(message, repeated, tag = "12")]
    pub conditions: Vec<pb::Condition>,
    #[prost(bool, tag = "13")]
    pub cordoned: bool,
    #[prost(bool, tag = "14")]
    pub draining: bool,
    #[prost(message, repeated, tag = "16")]
    pub tasks: Vec<LiteTask>,
    #[prost(bool, tag = "21")]
    pub unchanged: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LiteTask {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(string, tag = "2")]
    pub job: String,
    #[prost(int32, tag = "3")]
    pub state: i32,
    #[prost(int32, tag = "4")]
    pub reason: i32,
    #[prost(int32, tag = "5")]
    pub exit_code: i32,
    #[prost(string, tag = "7")]
    pub message: String,
}

impl From<LiteStatus> for pb::NodeStatus {
    fn from(s: LiteStatus) -> Self {
        pb::NodeStatus {
            generation: s.generation,
            identity: s.identity,
            boot_id: s.boot_id,
            image_version: s.image_version,
            celld_version: s.celld_version,
            allocatable: s.allocatable,
            conditions: s.conditions,
            cordoned: s.cordoned,
            draining: s.draining,
            unchanged: s.unchanged,
            tasks: s
                .tasks
                .into_iter()
                .map(|t| pb::TaskStatus {
                    id: t.id,
                    job: t.job,
                    state: t.state,
                    reason: t.reason,
                    exit_code: t.exit_code,
                    message: t.message,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn the_lite_decoding_keeps_what_the_master_reads() {
        let full = pb::NodeStatus {
            generation: 7,
            boot_id: "b".into(),
            image_version: "v2".into(),
            celld_version: "0.1.0".into(),
            allocatable: Some(pb::Resources {
                memory_bytes: 1 << 30,
                cpu_millis: 1900,
                pids_max: 4096,
            }),
            conditions: vec![pb::Condition {
                r#type: "Ready".into(),
                status: true,
                ..Default::default()
            }],
            cordoned: true,
            draining: true,
            uptime_seconds: 12.5,
            sysctls: vec![pb::SysctlResult::default()],
            tasks: vec![pb::TaskStatus {
                id: "web-0-1".into(),
                job: "web".into(),
                state: pb::TaskState::Dead as i32,
                reason: pb::TaskReason::Exited as i32,
                exit_code: 3,
                message: "boom".into(),
                pid: 42,
                transitions: vec![pb::Transition::default(); 4],
                usage: Some(pb::TaskUsage::default()),
                ..Default::default()
            }],
            ..Default::default()
        };
        let lite = LiteStatus::decode(full.encode_to_vec().as_slice()).unwrap();
        let back: pb::NodeStatus = lite.into();
        let t = &back.tasks[0];
        assert_eq!(
            (
                t.id.as_str(),
                t.job.as_str(),
                t.state,
                t.reason,
                t.exit_code,
                t.message.as_str()
            ),
            (
                "web-0-1",
                "web",
                full.tasks[0].state,
                full.tasks[0].reason,
                3,
                "boom"
            )
        );
        assert_eq!(back.generation, 7);
        assert_eq!(
            (back.boot_id.as_str(), back.image_version.as_str()),
            ("b", "v2")
        );
        assert_eq!(back.allocatable, full.allocatable);
        assert_eq!(back.conditions, full.conditions);
        assert!(back.cordoned && back.draining);
        // What the master does not read is not decoded.
        assert!(back.sysctls.is_empty() && t.transitions.is_empty() && t.usage.is_none());
    }
}

//! The seed corpus: one valid input per request kind (and a few refusals worth starting
//! from), written to `corpus/<target>/` by `cargo run --example write_seeds`.

use celld_proto::v1 as pb;
use ed25519_dalek::{Signer, SigningKey};
use prost::Message;

use crate::{master, node};

/// A job file cellmaster accepts.
pub const JOB: &str = r#"name = "web"
replicas = 3
priority = 100
argv = ["/bin/sh", "-c", "httpd -f -p 8080"]
rootfs = "/rootfs/busybox"
env = { A = "1" }
[resources]
memory = "64MiB"
cpu_millis = 250
pids_max = 64
[restart]
mode = "on-failure"
[constraints]
labels = { zone = "a" }
[budget]
max_unavailable = 1
"#;

/// A manifest as `cellimg build` writes it.
pub const MANIFEST: &str = r#"{"version":"v2","kernel_cmdline":"console=ttyS0","artifacts":{
"vmlinuz":{"sha256":"2bd7692f620f2cf7b0cbf6728581edbb34d4a3c33177f3a887d4c1a67d8c6396","size":10},
"initramfs.cpio.gz":{"sha256":"dfbe09b30d6335cbb607cd6e1f0dec839d39d5619d0608708a1bd8f03d43ea7c","size":20},
"node.iso":{"sha256":"2bd7692f620f2cf7b0cbf6728581edbb34d4a3c33177f3a887d4c1a67d8c6396","size":1}}}"#;

/// A node's certificate request (P-256, `CN=node-a`), made once with
/// `openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout /dev/null
/// -subj /CN=node-a -outform DER`: the seeds stay the same from run to run.
const NODE_CSR: &[u8] = include_bytes!("node-a.csr.der");

/// A RunTask spec given as an OCI runtime config.
const OCI_CONFIG: &str = r#"{"ociVersion":"1.0.2",
"process":{"terminal":false,"user":{"uid":0,"gid":0},"args":["sh","-c","echo hi"],
 "env":["PATH=/bin"],"cwd":"/","noNewPrivileges":true},
"root":{"path":"/rootfs/busybox","readonly":true},"hostname":"t1",
"linux":{"resources":{"memory":{"limit":67108864},"cpu":{"quota":50000,"period":100000},
 "pids":{"limit":64}}}}"#;

/// One seed: the target it belongs to, a file name, the bytes.
pub struct Seed {
    pub target: &'static str,
    pub name: String,
    pub bytes: Vec<u8>,
    /// Whether the server accepts it (checked by the tests).
    pub accepted: bool,
}

fn request(target: &'static str, kinds: &[&str], kind: &str, m: &impl Message) -> Seed {
    let index = kinds.iter().position(|k| *k == kind).expect("a known kind");
    let mut bytes = vec![u8::try_from(index).expect("fewer than 256 kinds")];
    m.encode(&mut bytes).expect("a Vec grows");
    Seed {
        target,
        name: kind.to_ascii_lowercase(),
        bytes,
        accepted: true,
    }
}

fn node(kind: &str, m: &impl Message) -> Seed {
    request("node_requests", &node::KINDS, kind, m)
}

fn master(kind: &str, m: &impl Message) -> Seed {
    request("master_requests", &master::KINDS, kind, m)
}

fn task_spec() -> pb::TaskSpec {
    pb::TaskSpec {
        id: "web-0".into(),
        job: "web".into(),
        argv: vec!["/bin/sh".into(), "-c".into(), "sleep 1".into()],
        env: [("A".to_string(), "1".to_string())].into(),
        cwd: "/tmp".into(),
        rootfs: "/rootfs/busybox".into(),
        resources: Some(pb::Resources {
            memory_bytes: 64 << 20,
            cpu_millis: 250,
            pids_max: 64,
        }),
        priority: 100,
        restart_policy: Some(pb::RestartPolicy {
            mode: pb::restart_policy::Mode::OnFailure.into(),
            initial_backoff_ms: 100,
            max_backoff_ms: 1000,
            max_restarts: 3,
        }),
        isolation: Some(pb::Isolation {
            add_capabilities: vec!["CAP_NET_BIND_SERVICE".into()],
            drop_capabilities: vec!["CAP_KILL".into()],
            hostname: "web-0".into(),
            rlimits: vec![pb::Rlimit {
                name: "RLIMIT_NOFILE".into(),
                soft: 1024,
                hard: 4096,
            }],
            ..Default::default()
        }),
        kill_grace_ms: 2000,
        ..Default::default()
    }
}

fn reimage() -> pb::ReimageRequest {
    let key = SigningKey::from_bytes(&node::MASTER_SEED);
    pb::ReimageRequest {
        version: "v2".into(),
        kernel_url: "http://10.0.0.1:8080/images/v2/vmlinuz".into(),
        initramfs_url: "http://[fd00::1]/images/v2/initramfs.cpio.gz".into(),
        cmdline: String::new(),
        manifest: MANIFEST.as_bytes().to_vec(),
        manifest_signature: key.sign(MANIFEST.as_bytes()).to_bytes().to_vec(),
    }
}

/// Every seed of every target.
pub fn seeds() -> Vec<Seed> {
    let oci = pb::TaskSpec {
        id: "oci-0".into(),
        oci_config_json: OCI_CONFIG.into(),
        ..Default::default()
    };
    let mut seeds = vec![
        node(
            "GetStatus",
            &pb::GetStatusRequest {
                if_generation_differs_from: 7,
            },
        ),
        node(
            "RunTask",
            &pb::RunTaskRequest {
                spec: Some(task_spec()),
            },
        ),
        Seed {
            name: "runtask-oci".into(),
            ..node("RunTask", &pb::RunTaskRequest { spec: Some(oci) })
        },
        node(
            "KillTask",
            &pb::KillTaskRequest {
                id: "web-0".into(),
                grace_ms: 500,
            },
        ),
        node("ListTasks", &pb::ListTasksRequest { job: "web".into() }),
        node(
            "WatchTasks",
            &pb::WatchTasksRequest {
                initial_state: true,
            },
        ),
        node(
            "TaskLogs",
            &pb::TaskLogsRequest {
                id: "web-0".into(),
                follow: true,
                tail: 10,
            },
        ),
        node("Cordon", &pb::CordonRequest {}),
        node("Uncordon", &pb::UncordonRequest {}),
        node("Drain", &pb::DrainRequest { grace_ms: 1000 }),
        node(
            "ApplySysctls",
            &pb::ApplySysctlsRequest {
                // One key: a map's encoding follows HashMap order.
                sysctls: [("vm.swappiness".to_string(), "10".to_string())].into(),
            },
        ),
        node("Reimage", &reimage()),
        node("Reboot", &pb::RebootRequest {}),
        node("Poweroff", &pb::PoweroffRequest {}),
        master(
            "Register",
            &pb::RegisterRequest {
                identity: Some(pb::NodeIdentity {
                    machine_id: "0123456789abcdef0123456789abcdef".into(),
                    hostname: "node-a".into(),
                    macs: vec!["eth0=52:54:00:12:34:56".into()],
                    addresses: vec!["10.0.0.9".into()],
                }),
                boot_id: "a1b2c3d4-0000-4000-8000-000000000001".into(),
                grpc_port: 7070,
                image_version: "v1".into(),
                celld_version: "0.1.0".into(),
                labels: [("zone".to_string(), "a".to_string())].into(),
                allocatable: Some(pb::Resources {
                    memory_bytes: 7 << 30,
                    cpu_millis: 4000,
                    pids_max: 4096,
                }),
                capacity: Some(pb::Resources {
                    memory_bytes: 8 << 30,
                    cpu_millis: 4000,
                    pids_max: 4194304,
                }),
                join_token: "0123abcd.0123456789abcdef0123456789abcdef".into(),
                csr: NODE_CSR.to_vec(),
            },
        ),
        master("ListNodes", &pb::ListNodesRequest {}),
        master(
            "SubmitJob",
            &pb::SubmitJobRequest {
                job_toml: JOB.into(),
                file_name: "web.toml".into(),
            },
        ),
        master("ListCellTasks", &pb::ListCellTasksRequest {}),
        master("ListJobs", &pb::ListJobsRequest {}),
        master("Describe", &pb::DescribeRequest { id: "web".into() }),
        master(
            "Kill",
            &pb::KillRequest {
                target: "web-0".into(),
                grace_ms: 500,
            },
        ),
        master(
            "SetCordon",
            &pb::SetCordonRequest {
                node: "node-a".into(),
                cordoned: true,
            },
        ),
        master(
            "DrainNode",
            &pb::DrainNodeRequest {
                node: "node-a".into(),
                ..Default::default()
            },
        ),
        master(
            "CellTaskLogs",
            &pb::CellTaskLogsRequest {
                id: "web-0".into(),
                follow: false,
                tail: 100,
            },
        ),
        master(
            "ImageChunk",
            &pb::ImageChunk {
                file: "manifest.json".into(),
                data: MANIFEST.as_bytes().to_vec(),
                make_default: true,
            },
        ),
        master("ListImages", &pb::ListImagesRequest {}),
        master(
            "StartRollout",
            &pb::StartRolloutRequest {
                to_version: "v2".into(),
                selector: "zone=a".into(),
                max_unavailable: 1,
                ..Default::default()
            },
        ),
        master("GetRollout", &pb::GetRolloutRequest {}),
        master(
            "ControlRollout",
            &pb::ControlRolloutRequest {
                action: pb::control_rollout_request::Action::Pause.into(),
            },
        ),
        master(
            "CreateJoinToken",
            &pb::CreateJoinTokenRequest {
                ttl_seconds: 3600,
                uses: 3,
                pxe: true,
            },
        ),
    ];
    seeds.push(Seed {
        target: "jobfile",
        name: "web".into(),
        bytes: JOB.as_bytes().to_vec(),
        accepted: true,
    });
    seeds.push(Seed {
        target: "image_manifest",
        name: "cellimg".into(),
        bytes: MANIFEST.as_bytes().to_vec(),
        accepted: true,
    });
    seeds
}

/// Where a seed lives in the checked-in corpus.
pub fn path(seed: &Seed) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(seed.target)
        .join(&seed.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_seed_gets_the_answer_the_server_gives() {
        for s in seeds() {
            let outcome = crate::run(s.target, &s.bytes);
            assert_eq!(
                outcome.is_ok(),
                s.accepted,
                "{}/{}: {outcome:?}",
                s.target,
                s.name
            );
        }
    }

    #[test]
    fn every_request_kind_has_a_seed() {
        let seeds = seeds();
        for (target, kinds) in [
            ("node_requests", &node::KINDS[..]),
            ("master_requests", &master::KINDS[..]),
        ] {
            for kind in kinds {
                let name = kind.to_ascii_lowercase();
                assert!(
                    seeds.iter().any(|s| s.target == target && s.name == name),
                    "{target}: no seed for {kind}"
                );
            }
        }
    }

    #[test]
    fn the_checked_in_corpus_holds_the_seeds() {
        for s in seeds() {
            let path = path(&s);
            let on_disk = std::fs::read(&path).unwrap_or_default();
            assert!(
                on_disk == s.bytes,
                "{} differs from its seed: cargo run --example write_seeds",
                path.display()
            );
        }
    }
}

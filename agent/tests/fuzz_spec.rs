//! Property tests (bounded: a fixed number of cases per run) over spec conversion,
//! validation and the OCI mapping: arbitrary input never panics, and whatever passes
//! validation is safe to turn into paths.

use celld::api::convert::task_spec_from_proto;
use celld::task::oci::task_from_oci;
use celld::task::spec::NodeLimits;
use celld_proto::v1 as pb;
use proptest::prelude::*;

fn node() -> NodeLimits {
    NodeLimits {
        memory_bytes: 8 << 30,
        cpu_millis: 4000,
        pids_max: 100_000,
    }
}

fn blank_spec() -> celld::task::spec::TaskSpec {
    celld::task::spec::TaskSpec {
        id: "t".into(),
        job: String::new(),
        argv: vec![],
        env: Default::default(),
        cwd: String::new(),
        rootfs: Default::default(),
        resources: Default::default(),
        priority: 0,
        restart: Default::default(),
        isolation: Default::default(),
        kill_grace: std::time::Duration::from_secs(1),
    }
}

fn any_string() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9-]{0,70}",
        "\\PC{0,40}",
        Just("../..".to_string()),
        Just("/".to_string()),
        Just("a\0b".to_string()),
    ]
}

prop_compose! {
    fn any_spec()(
        id in any_string(),
        job in any_string(),
        argv in proptest::collection::vec(any_string(), 0..4),
        env in proptest::collection::btree_map(any_string(), any_string(), 0..3),
        cwd in any_string(),
        rootfs in prop_oneof![any_string(), Just("/srv/rootfs".to_string())],
        memory in any::<u64>(),
        cpu in any::<u64>(),
        pids in any::<u64>(),
        priority in any::<i32>(),
        mode in any::<i32>(),
        backoff in any::<u32>(),
        network in any::<i32>(),
        caps in proptest::collection::vec(any_string(), 0..3),
        rlimit in any_string(),
        soft in any::<u64>(),
        hard in any::<u64>(),
    ) -> pb::TaskSpec {
        pb::TaskSpec {
            id, job, argv, env: env.into_iter().collect(), cwd, rootfs,
            resources: Some(pb::Resources { memory_bytes: memory, cpu_millis: cpu, pids_max: pids }),
            priority,
            restart_policy: Some(pb::RestartPolicy {
                mode, initial_backoff_ms: backoff, max_backoff_ms: backoff / 2, max_restarts: 1,
            }),
            isolation: Some(pb::Isolation {
                network,
                add_capabilities: caps,
                rlimits: vec![pb::Rlimit { name: rlimit, soft, hard }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        "[a-zA-Z/]{0,12}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            proptest::collection::btree_map(
                prop_oneof![
                    Just("process".to_string()),
                    Just("root".to_string()),
                    Just("linux".to_string()),
                    Just("args".to_string()),
                    Just("resources".to_string()),
                    Just("memory".to_string()),
                    Just("limit".to_string()),
                    "[a-z]{1,8}",
                ],
                inner,
                0..4
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn conversion_and_validation_never_panic(p in any_spec()) {
        if let Ok(spec) = task_spec_from_proto(p)
            && spec.validate(&node()).is_ok()
        {
            // What passes may become a cgroup and a file name.
            prop_assert!(!spec.id.contains('/') && !spec.id.contains(".."));
            prop_assert!(spec.rootfs.is_absolute());
            prop_assert!(spec.resources.memory_bytes <= node().memory_bytes);
            prop_assert!(spec.resources.cpu_millis >= 1);
        }
    }

    #[test]
    fn the_oci_mapping_never_panics(v in json_value()) {
        let spec = blank_spec();
        if let Ok(t) = task_from_oci(&v.to_string(), spec) {
            let _ = t.validate(&node());
        }
    }

    #[test]
    fn arbitrary_bytes_as_oci_config_never_panic(s in "\\PC{0,200}") {
        let spec = blank_spec();
        let _ = task_from_oci(&s, spec);
    }
}

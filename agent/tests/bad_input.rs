//! Privileged tests: bad requests get clear errors naming the field, and leave the agent
//! and its other tasks untouched.

mod common;

use celld_proto::v1 as pb;
use common::Node;
use tonic::Code;

async fn refused(n: &mut Node, spec: pb::TaskSpec) -> tonic::Status {
    n.client
        .run_task(pb::RunTaskRequest { spec: Some(spec) })
        .await
        .expect_err("celld accepted a bad spec")
}

#[tokio::test]
async fn bad_specs_name_their_field_and_leave_running_tasks_alone() {
    let mut n = Node::start().await;
    n.run(n.spec("bystander", &["sleep", "600"])).await;
    let before = n.wait_running("bystander").await;

    let mut cases: Vec<(pb::TaskSpec, Code, &str)> = Vec::new();
    let mut s = n.spec("a/../b", &["true"]);
    cases.push((s.clone(), Code::InvalidArgument, "id"));
    s = n.spec("no-rootfs", &["true"]);
    s.rootfs = "/nonexistent/rootfs".into();
    cases.push((s, Code::InvalidArgument, "rootfs"));
    s = n.spec("no-prog", &["/bin/not-here"]);
    cases.push((s, Code::InvalidArgument, "argv"));
    s = n.spec("zero-mem", &["true"]);
    s.resources.as_mut().unwrap().memory_bytes = 0;
    cases.push((s, Code::InvalidArgument, "resources.memory_bytes"));
    s = n.spec("huge-mem", &["true"]);
    s.resources.as_mut().unwrap().memory_bytes = u64::MAX;
    cases.push((s, Code::InvalidArgument, "resources.memory_bytes"));
    s = n.spec("huge-cpu", &["true"]);
    s.resources.as_mut().unwrap().cpu_millis = 1 << 40;
    cases.push((s, Code::InvalidArgument, "resources.cpu_millis"));
    s = n.spec("bad-prio", &["true"]);
    s.priority = -5;
    cases.push((s, Code::InvalidArgument, "priority"));
    s = n.spec("bad-cap", &["true"]);
    s.isolation = Some(pb::Isolation {
        add_capabilities: vec!["CAP_TELEPORT".into()],
        ..Default::default()
    });
    cases.push((s, Code::InvalidArgument, "isolation.add_capabilities[0]"));
    s = pb::TaskSpec {
        id: "oci-bad".into(),
        oci_config_json: r#"{"process":{"args":["true"],"cwd":"/","user":{"uid":0,"gid":0}},
            "root":{"path":"/"},"hooks":{"prestart":[]}}"#
            .into(),
        ..Default::default()
    };
    cases.push((s, Code::InvalidArgument, "oci_config_json.hooks"));

    for (spec, code, field) in cases {
        let id = spec.id.clone();
        let e = refused(&mut n, spec).await;
        assert_eq!(e.code(), code, "{id}: {e}");
        assert!(
            e.message().starts_with(&format!("{field}:")),
            "{id}: error does not name {field}: {}",
            e.message()
        );
    }
    let e = n
        .client
        .run_task(pb::RunTaskRequest { spec: None })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = n.kill("../../etc", 0).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = n.kill("ghost", 0).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = n
        .client
        .apply_sysctls(pb::ApplySysctlsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // Nothing was created, and the bystander never noticed.
    let tasks = n
        .client
        .list_tasks(pb::ListTasksRequest::default())
        .await
        .unwrap()
        .into_inner()
        .tasks;
    assert_eq!(tasks.len(), 1);
    let after = n.task("bystander").await;
    assert_eq!(after.state, pb::TaskState::Running as i32);
    assert_eq!(after.pid, before.pid);
}

#[tokio::test]
async fn a_message_of_several_mib_is_refused_and_the_agent_keeps_serving() {
    let mut n = Node::start().await;
    let mut spec = n.spec("big", &["true"]);
    spec.argv.push("x".repeat(4 << 20));
    let e = refused(&mut n, spec).await;
    assert!(
        matches!(
            e.code(),
            Code::ResourceExhausted | Code::OutOfRange | Code::InvalidArgument
        ),
        "{e}"
    );
    let status = n.status().await;
    assert!(status.tasks.is_empty());
    let (t, _) = n.run_to_end(n.spec("after-big", &["true"])).await;
    assert_eq!(t.exit_code, 0);
}

#[tokio::test]
async fn a_bad_command_line_is_an_error_that_names_the_flag() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_celld"))
        .args(["--listen", "not-an-address"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("listen"), "{err}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_celld"))
        .args(["--frobnicate", "1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("node.toml");
    std::fs::write(&cfg, "listen = \"127.0.0.1:0\"\nsysctl = {}\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_celld"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("sysctl"), "{err}");
}

#[tokio::test]
async fn health_and_reflection_answer() {
    let n = Node::start().await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", n.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let r = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "celld.v1.Node".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut refl = ServerReflectionClient::new(channel);
    let req = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = refl
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("no service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"celld.v1.Node".to_string()), "{names:?}");
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );
}

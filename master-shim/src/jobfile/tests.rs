//! Tests of job-file parsing and checking.

use super::*;

const GOOD: &str = r#"name = "web"
replicas = 3
priority = 100
argv = ["/bin/sh", "-c", "httpd -f -p 8080"]
rootfs = "/rootfs/busybox"
env = { A = "1" }
[resources]
memory_bytes = 67108864
cpu_millis = 250
pids_max = 64
[restart]
mode = "on-failure"
[constraints]
labels = { zone = "a" }
[budget]
max_unavailable = 1
"#;

/// GOOD with the line starting `key` replaced by `with` (or removed when empty).
fn edit(key: &str, with: &str) -> String {
    let mut found = false;
    let out: Vec<&str> = GOOD
        .lines()
        .filter_map(|l| {
            if l.starts_with(key) {
                found = true;
                (!with.is_empty()).then_some(with)
            } else {
                Some(l)
            }
        })
        .collect();
    assert!(found, "no line starts with {key}");
    out.join("\n") + "\n"
}

fn err(text: &str) -> JobFileError {
    parse_job(text).expect_err("should be refused")
}

#[test]
fn the_example_parses() {
    let j = parse_job(GOOD).unwrap();
    assert_eq!(j.name, "web");
    assert_eq!(j.replicas, 3);
    assert_eq!(j.priority, 100);
    assert_eq!(j.argv, ["/bin/sh", "-c", "httpd -f -p 8080"]);
    assert_eq!(j.rootfs, "/rootfs/busybox");
    assert_eq!(j.env["A"], "1");
    let r = j.resources;
    assert_eq!(
        (r.memory_bytes, r.cpu_millis, r.pids_max),
        (64 << 20, 250, 64)
    );
    assert_eq!(j.restart.mode, RestartMode::OnFailure);
    assert_eq!(j.constraints.labels["zone"], "a");
    assert_eq!(j.budget.max_unavailable, 1);
    // The store keeps it as JSON and must get the same job back.
    let back: JobSpec = serde_json::from_str(&serde_json::to_string(&j).unwrap()).unwrap();
    assert_eq!(back, j);
}

#[test]
fn defaults_for_optional_sections() {
    let j = parse_job(
        "name = \"a\"\nargv = [\"/x\"]\nrootfs = \"/r\"\n\
         [resources]\nmemory = \"1.5GiB\"\ncpu_millis = 1\n",
    )
    .unwrap();
    assert_eq!(j.replicas, 1);
    assert_eq!(j.priority, 0);
    assert_eq!(j.resources.memory_bytes, 3 << 29);
    assert_eq!(j.resources.pids_max, 0);
    assert_eq!(j.restart, RestartPolicy::default());
    assert_eq!(j.budget.max_unavailable, 1);
}

#[test]
fn memory_as_a_size() {
    let j = parse_job(&edit("memory_bytes", "memory = \"64MiB\"")).unwrap();
    assert_eq!(j.resources.memory_bytes, 64 << 20);
    assert_eq!(parse_size("100MB"), Ok(100_000_000));
    assert_eq!(parse_size("2 GiB"), Ok(2 << 30));
    assert_eq!(parse_size("4096"), Ok(4096));
    assert!(parse_size("64 parsecs").unwrap_err().contains("unit"));
    assert!(parse_size("MiB").is_err());
    assert!(
        parse_size("99999999999TiB")
            .unwrap_err()
            .contains("too large")
    );
}

#[test]
fn a_misspelt_key_names_line_and_field() {
    let e = err(&edit("replicas", "replica = 3"));
    assert_eq!(e.line(), Some(2));
    let msg = e.to_string();
    assert!(
        msg.starts_with("job.toml line 2, column 1: unknown field `replica`, expected one of"),
        "{msg}"
    );
    assert!(msg.contains("`replicas`"), "{msg}");
}

#[test]
fn unknown_keys_in_every_table_are_refused() {
    for (key, line) in [
        ("cpu_millis", "cpu_milis = 250"),
        ("mode", "mod = \"always\""),
        ("labels", "label = { zone = \"a\" }"),
        ("max_unavailable", "max_unavail = 1"),
    ] {
        let e = err(&edit(key, line));
        assert!(e.to_string().contains("unknown field"), "{key}: {e}");
        assert!(e.line().is_some(), "{key}: {e}");
    }
}

#[test]
fn a_wrong_type_names_the_field() {
    let e = err(&edit("replicas", "replicas = \"3\""));
    assert_eq!(e.field(), Some("replicas"));
    assert_eq!(e.line(), Some(2));
    let e = err(&edit("cpu_millis", "cpu_millis = \"lots\""));
    assert_eq!(e.field(), Some("resources.cpu_millis"));
    assert_eq!(e.line(), Some(9));
    assert!(
        e.to_string()
            .contains("job.toml line 9, column 14: resources.cpu_millis: "),
        "{e}"
    );
    let e = err(&edit("mode", "mode = \"sometimes\""));
    assert_eq!(e.field(), Some("restart.mode"));
}

#[test]
fn a_missing_field_is_named() {
    let e = err(&edit("argv", ""));
    assert_eq!(e.to_string(), "job.toml: missing field `argv`");
    let e = err(&edit("cpu_millis", ""));
    assert!(e.to_string().contains("missing field `cpu_millis`"), "{e}");
    let e = err(&edit("memory_bytes", ""));
    assert_eq!(e.field(), Some("resources.memory_bytes"));
}

#[test]
fn not_toml_at_all() {
    let e = err("name = \"web\"\nreplicas = = 3\n");
    assert_eq!(e.line(), Some(2));
}

#[test]
fn names() {
    for bad in ["", "Web", "web_1", "a/b", &"x".repeat(41)] {
        let e = err(&edit("name", &format!("name = {bad:?}")));
        assert_eq!(e.field(), Some("name"), "{bad}");
        assert_eq!(e.line(), Some(1));
        assert!(e.to_string().contains("[a-z0-9-]"), "{e}");
    }
    assert!(parse_job(&edit("name", &format!("name = {:?}", "a".repeat(40)))).is_ok());
    assert!(parse_job(&edit("name", "name = \"web-2\"")).is_ok());
}

#[test]
fn replicas_zero_and_huge() {
    let e = err(&edit("replicas", "replicas = 0"));
    assert_eq!(
        e.to_string(),
        "job.toml line 2: replicas: 0 is outside 1..=1000"
    );
    let e = err(&edit("replicas", "replicas = 1001"));
    assert_eq!(e.field(), Some("replicas"));
    // Past u32: serde's own range error, still with the field.
    let e = err(&edit("replicas", "replicas = 99999999999"));
    assert_eq!(e.field(), Some("replicas"));
    assert_eq!(e.line(), Some(2));
    let e = err(&edit("replicas", "replicas = -1"));
    assert_eq!(e.field(), Some("replicas"));
}

#[test]
fn priority_range() {
    let e = err(&edit("priority", "priority = 1001"));
    assert_eq!(e.field(), Some("priority"));
    assert_eq!(e.line(), Some(3));
    assert!(parse_job(&edit("priority", "priority = 1000")).is_ok());
    assert!(parse_job(&edit("priority", "priority = 0")).is_ok());
}

#[test]
fn argv_and_rootfs() {
    let e = err(&edit("argv", "argv = []"));
    assert_eq!(e.field(), Some("argv"));
    assert_eq!(e.line(), Some(4));
    let e = err(&edit("rootfs", "rootfs = \"rootfs/busybox\""));
    assert_eq!(e.field(), Some("rootfs"));
    assert!(e.to_string().contains("absolute"), "{e}");
}

#[test]
fn resource_minimums() {
    let e = err(&edit("memory_bytes", "memory_bytes = 1000"));
    assert_eq!(
        e.to_string(),
        "job.toml line 8: resources.memory_bytes: 1000 bytes is below the minimum of 1 MiB"
    );
    let e = err(&edit("memory_bytes", "memory = \"512KiB\""));
    assert_eq!(e.field(), Some("resources.memory"));
    let e = err(&edit("memory_bytes", "memory = \"lots\""));
    assert_eq!(e.field(), Some("resources.memory"));
    let e = err(&edit("cpu_millis", "cpu_millis = 0"));
    assert_eq!(e.field(), Some("resources.cpu_millis"));
    assert_eq!(e.line(), Some(9));
    let e = err(&edit(
        "memory_bytes",
        "memory_bytes = 67108864\nmemory = \"64MiB\"",
    ));
    assert!(e.to_string().contains("twice"), "{e}");
}

#[test]
fn budget_range() {
    let e = err(&edit("max_unavailable", "max_unavailable = 0"));
    assert_eq!(e.field(), Some("budget.max_unavailable"));
    assert_eq!(e.line(), Some(16));
    let e = err(&edit("max_unavailable", "max_unavailable = 4"));
    assert!(e.to_string().contains("1..=3"), "{e}");
    assert!(parse_job(&edit("max_unavailable", "max_unavailable = 3")).is_ok());
}

#[test]
fn the_file_name_is_the_callers() {
    let e = parse_job_named("jobs/web.toml", &edit("replicas", "replicas = 0")).unwrap_err();
    assert!(e.to_string().starts_with("jobs/web.toml line 2: "), "{e}");
}

#[test]
fn fits_somewhere() {
    let j = parse_job(GOOD).unwrap();
    let big = Resources {
        memory_bytes: 8 << 30,
        cpu_millis: 4000,
        pids_max: 4_194_304,
    };
    assert_eq!(check_fits_somewhere(&j, big), Ok(()));
    let e = check_fits_somewhere(
        &j,
        Resources {
            memory_bytes: 32 << 20,
            ..big
        },
    )
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "resources.memory_bytes: 64 MiB is more than any node can give \
         (the largest has 32 MiB)"
    );
    let e = check_fits_somewhere(
        &j,
        Resources {
            cpu_millis: 100,
            ..big
        },
    )
    .unwrap_err();
    assert_eq!(e.field(), Some("resources.cpu_millis"));
    let e = check_fits_somewhere(
        &j,
        Resources {
            pids_max: 10,
            ..big
        },
    )
    .unwrap_err();
    assert_eq!(e.field(), Some("resources.pids_max"));
    // A node that has not said its pid limit does not refuse.
    assert_eq!(
        check_fits_somewhere(&j, Resources { pids_max: 0, ..big }),
        Ok(())
    );
}

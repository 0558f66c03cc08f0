use super::*;
use crate::jobfile::Resources;

fn expected(id: &str, node: &str, state: TaskState, attempt: u32) -> TaskRow {
    TaskRow {
        id: id.into(),
        job: id.rsplit_once('-').unwrap().0.into(),
        replica: 0,
        node: Some(node.into()),
        state,
        reason: String::new(),
        priority: 100,
        resources: Resources::default(),
        attempt,
    }
}

fn observed(id: &str, job: &str, state: pb::TaskState) -> pb::TaskStatus {
    pb::TaskStatus {
        id: id.into(),
        job: job.into(),
        state: state as i32,
        exit_code: -1,
        ..Default::default()
    }
}

fn ended(id: &str, reason: pb::TaskReason, exit_code: i32) -> pb::TaskStatus {
    pb::TaskStatus {
        reason: reason as i32,
        exit_code,
        ..observed(id, "web", pb::TaskState::Dead)
    }
}

fn set(task: &str, state: TaskState) -> (String, TaskState) {
    (task.to_string(), state)
}

fn states(actions: &[Action]) -> Vec<(String, TaskState)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::SetState { task_id, state, .. } => Some((task_id.clone(), *state)),
            Action::Kill { .. } => None,
        })
        .collect()
}

fn kills(actions: &[Action]) -> Vec<String> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Kill { node_task_id, .. } => Some(node_task_id.clone()),
            Action::SetState { .. } => None,
        })
        .collect()
}

#[test]
fn an_assigned_task_seen_running_becomes_running_once() {
    let none = BTreeSet::new();
    let mut web = expected("web-0", "n1", TaskState::Assigned, 1);
    let seen = [observed("web-0-1", "web", pb::TaskState::Running)];
    let a = reconcile("n1", std::slice::from_ref(&web), &seen, &none);
    assert_eq!(states(&a), [set("web-0", TaskState::Running)]);
    web.state = TaskState::Running;
    assert!(reconcile("n1", &[web], &seen, &none).is_empty());
}

#[test]
fn a_starting_task_stays_assigned() {
    let web = expected("web-0", "n1", TaskState::Assigned, 1);
    let seen = [observed("web-0-1", "web", pb::TaskState::Starting)];
    assert!(reconcile("n1", &[web], &seen, &BTreeSet::new()).is_empty());
}

#[test]
fn endings_map_to_master_states() {
    use pb::TaskReason as R;
    let cases = [
        (ended("web-0-1", R::Exited, 0), TaskState::Succeeded),
        (ended("web-0-1", R::Exited, 3), TaskState::Failed),
        (ended("web-0-1", R::OomKilled, -1), TaskState::Failed),
        (ended("web-0-1", R::FailedToStart, -1), TaskState::Failed),
        (ended("web-0-1", R::Killed, -1), TaskState::Lost),
        (ended("web-0-1", R::NodeShutdown, -1), TaskState::Lost),
        (
            pb::TaskStatus {
                reason: R::Preempted as i32,
                ..observed("web-0-1", "web", pb::TaskState::Evicted)
            },
            TaskState::Preempted,
        ),
        (
            pb::TaskStatus {
                reason: R::NodeDrain as i32,
                ..observed("web-0-1", "web", pb::TaskState::Evicted)
            },
            TaskState::Evicted,
        ),
    ];
    for (status, want) in cases {
        let web = expected("web-0", "n1", TaskState::Running, 1);
        let a = reconcile(
            "n1",
            &[web],
            std::slice::from_ref(&status),
            &BTreeSet::new(),
        );
        assert_eq!(states(&a), [set("web-0", want)], "{status:?}");
    }
}

#[test]
fn a_missing_task_is_lost_unless_just_placed() {
    let web = expected("web-0", "n1", TaskState::Running, 2);
    let a = reconcile("n1", std::slice::from_ref(&web), &[], &BTreeSet::new());
    assert_eq!(states(&a), [set("web-0", TaskState::Lost)]);
    let recent = BTreeSet::from(["web-0".to_string()]);
    assert!(reconcile("n1", &[web], &[], &recent).is_empty());
}

#[test]
fn an_old_attempt_is_killed_and_does_not_count_as_the_current_one() {
    // Attempt 1 ran here, the node went away, the task moved and came back as attempt 3.
    let web = expected("web-0", "n1", TaskState::Assigned, 3);
    let seen = [
        observed("web-0-1", "web", pb::TaskState::Running),
        observed("web-0-3", "web", pb::TaskState::Running),
    ];
    let a = reconcile("n1", &[web], &seen, &BTreeSet::new());
    assert_eq!(kills(&a), ["web-0-1"]);
    assert_eq!(states(&a), [set("web-0", TaskState::Running)]);
}

#[test]
fn tasks_of_unknown_jobs_are_killed_hand_started_ones_are_left() {
    let seen = [
        observed("gone-0-1", "gone", pb::TaskState::Running),
        observed("debug", "", pb::TaskState::Running),
        // Ended already: nothing to kill.
        ended("old-0-1", pb::TaskReason::Exited, 0),
    ];
    let a = reconcile("n1", &[], &seen, &BTreeSet::new());
    assert_eq!(kills(&a), ["gone-0-1"]);
    assert!(states(&a).is_empty());
}

#[test]
fn a_task_placed_on_another_node_is_not_this_nodes_business() {
    let web = expected("web-0", "n2", TaskState::Running, 2);
    // n1 still runs attempt 1 after the master moved it to n2: kill it on n1.
    let seen = [observed("web-0-1", "web", pb::TaskState::Running)];
    let a = reconcile("n1", &[web], &seen, &BTreeSet::new());
    assert_eq!(kills(&a), ["web-0-1"]);
    assert!(states(&a).is_empty());
}

#[test]
fn node_task_ids_round_trip() {
    let web = expected("web-api-10", "n1", TaskState::Running, 7);
    assert_eq!(web.node_task_id(), "web-api-10-7");
    assert_eq!(
        TaskRow::parse_node_task_id("web-api-10-7"),
        Some(("web-api-10", 7))
    );
    assert_eq!(TaskRow::parse_node_task_id("debug"), None);
    assert_eq!(TaskRow::parse_node_task_id("x-"), None);
}

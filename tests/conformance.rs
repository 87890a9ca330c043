//! One suite for the store, queue, blob and registry traits, run against every backend:
//! each test function below becomes a `sqlite_*` test on a temporary folder and an
//! `azure_*` test on the Azurite that `BGW_TEST_AZURE_CONNECTION_STRING` points to.
//!
//! Without that variable the `azure_*` tests print why and pass, except under `CI=true`,
//! where they fail: CI must never skip them. `tests/run` starts Azurite and sets it.

use std::sync::Arc;
use std::time::Duration;

use bgw::backend::azure::{AzureBackend, AzureOptions};
use bgw::backend::sqlite::{SqliteBackend, SqliteOptions};
use bgw::backend::{
    AttemptStart, Backend, BlobRef, CancelOutcome, Fenced, Finish, Lease, Limits, ListFilter,
    OutgoingMessage, RetryPolicy, Submitted,
};
use bgw::client::{StartOptions, StartRequest, WorkflowClient};
use bgw::record::{format_time, parse_time, QueueMessage, Status, TaskRecord};
use serde_json::Value;
use sha2::{Digest, Sha256};

const CASES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/cases");

const LIMITS: Limits = Limits {
    fuel: 1_000,
    memory_mib: 64,
    timeout_secs: 5,
    max_output_bytes: 1024,
    retry: RetryPolicy {
        max_attempts: 3,
        backoff_ms: 1_000,
        max_backoff_ms: 60_000,
    },
};

/// A backend under test and the temporary folder it keeps local files in.
struct Subject {
    backend: Arc<dyn Backend>,
    client: WorkflowClient,
    _dir: tempfile::TempDir,
}

fn sqlite_subject() -> Option<Subject> {
    let dir = tempfile::tempdir().unwrap();
    let backend: Arc<dyn Backend> =
        Arc::new(SqliteBackend::open(SqliteOptions::in_dir(dir.path())).unwrap());
    Some(Subject {
        client: WorkflowClient::new(backend.clone(), "bgw.db"),
        backend,
        _dir: dir,
    })
}

/// An Azure backend with its own tables and queue, so tests can run in parallel on one
/// Azurite.
fn azure_subject() -> Option<Subject> {
    let Some(connection) = std::env::var("BGW_TEST_AZURE_CONNECTION_STRING")
        .ok()
        .filter(|value| !value.is_empty())
    else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "BGW_TEST_AZURE_CONNECTION_STRING is not set, and CI must run the Azure tests: \
             start Azurite with tests/azurite"
        );
        eprintln!("skipping: BGW_TEST_AZURE_CONNECTION_STRING is not set (see tests/azurite)");
        return None;
    };
    let dir = tempfile::tempdir().unwrap();
    let unique = uuid::Uuid::new_v4().simple().to_string();
    let mut options = AzureOptions::new(connection, dir.path().join("components"));
    options.active_table = format!("A{}", &unique[..16]);
    options.finished_table = format!("F{}", &unique[..16]);
    options.queue_name = format!("q-{}", &unique[..16]);
    let backend: Arc<dyn Backend> = Arc::new(AzureBackend::open(options).unwrap());
    Some(Subject {
        client: WorkflowClient::new(backend.clone(), "local_tasks.db"),
        backend,
        _dir: dir,
    })
}

/// Generates `sqlite_<name>` and `azure_<name>` for each listed test function.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(subject) = super::sqlite_subject() {
                        super::$name(&subject, "sqlite").await;
                    }
                }
            )*
        }
        mod azure {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(subject) = super::azure_subject() {
                        super::$name(&subject, "azure").await;
                    }
                }
            )*
        }
    };
}

conformance!(
    submit_then_get_and_list,
    lease_hides_message_until_visibility_passes,
    stale_receipt_after_extend_is_fenced,
    begin_attempt_is_fenced_after_takeover,
    finish_moves_record_and_deletes_message,
    finish_dead_letters_message_then_requeue,
    retry_stores_record_and_delays_message,
    dead_letter_then_requeue,
    idempotency_key_reuse_checks_request,
    cancel_queued_and_running_tasks,
    end_unstarted_leaves_running_task,
    cancel_of_leased_task_keeps_one_record,
    registry_register_rollback_and_generation,
    registry_unregister_then_restore,
    timestamps_round_trip,
    case_payloads_reach_record_intact,
    rejected_resource_ids_write_nothing,
    blobs_put_open_and_delete,
    prune_deletes_old_finished_tasks,
    bulk_submit_stores_tasks_in_order,
);

// ---- helpers ----

fn new_record(resource_id: &str, task_type: &str) -> TaskRecord {
    let task_id = uuid::Uuid::now_v7().to_string();
    let mut record = TaskRecord::new(&task_id, resource_id, task_type, r#"{"x": 1}"#);
    let created = format_time(&record.created_time.unwrap());
    record.created_time = Some(parse_time(&created).unwrap());
    record
}

fn message_for(record: &TaskRecord, store_mode: &str) -> OutgoingMessage {
    OutgoingMessage::new(&QueueMessage {
        resource_id: record.partition_key.clone(),
        row_key: record.row_key.clone(),
        task_type: record.task_type.clone(),
        payload: serde_json::from_str(&record.input_payload).unwrap(),
        store_mode: store_mode.into(),
        active_table_name: "ActiveTasks".into(),
        finished_table_name: "FinishedTasks".into(),
        database_name: "local_tasks.db".into(),
    })
}

async fn submit_new(subject: &Subject, mode: &str) -> TaskRecord {
    let record = new_record("res-0001", "multiply");
    let submitted = subject
        .backend
        .submit(&record, &message_for(&record, mode))
        .await
        .unwrap();
    assert_eq!(submitted, Submitted::Created);
    record
}

async fn lease_one(subject: &Subject, visibility: Duration) -> Lease {
    let mut leases = subject.backend.lease(1, visibility).await.unwrap();
    assert_eq!(leases.len(), 1, "expected one visible message");
    leases.remove(0)
}

/// Leases the two visible messages and begins an attempt of `running`, which leaves its
/// record RUNNING and the other message leased.
async fn begin_running(subject: &Subject, running: &TaskRecord) {
    let leases = subject
        .backend
        .lease(2, Duration::from_secs(30))
        .await
        .unwrap();
    let lease = leases
        .into_iter()
        .find(|lease| lease.body.contains(&running.row_key))
        .expect("the running task's message");
    subject
        .backend
        .begin_attempt(&lease, &attempt_of(running, &lease))
        .await
        .unwrap();
}

fn attempt_of(record: &TaskRecord, lease: &Lease) -> AttemptStart {
    AttemptStart {
        resource_id: record.partition_key.clone(),
        task_id: record.row_key.clone(),
        attempt: lease.dequeue_count,
        component_digest: "d".repeat(64),
        component_version: 1,
        host_id: "host-a".into(),
        start_time: parse_time(&format_time(&chrono::Utc::now())).unwrap(),
    }
}

fn completed(record: &TaskRecord) -> TaskRecord {
    let mut record = record.clone();
    record.status = Status::Completed;
    record.output_payload = r#"{"product": 42}"#.into();
    record.end_time = Some(parse_time(&format_time(&chrono::Utc::now())).unwrap());
    record
}

/// Returns the records of every task with this id, in both tables.
async fn records_of(subject: &Subject, task_id: &str) -> Vec<TaskRecord> {
    let all = subject
        .backend
        .list_tasks(&ListFilter::default())
        .await
        .unwrap();
    all.into_iter()
        .filter(|record| record.row_key == task_id)
        .collect()
}

fn read_case(name: &str) -> Vec<u8> {
    std::fs::read(format!("{CASES}/{name}")).unwrap()
}

// ---- tests ----

async fn submit_then_get_and_list(subject: &Subject, mode: &str) {
    let record = submit_new(subject, mode).await;
    let by_key = subject
        .backend
        .get_task(Some("res-0001"), &record.row_key)
        .await
        .unwrap();
    assert_eq!(by_key.as_ref(), Some(&record));
    let by_id = subject
        .backend
        .get_task(None, &record.row_key)
        .await
        .unwrap();
    assert_eq!(by_id.as_ref(), Some(&record));

    let second = submit_new(subject, mode).await;
    let listed = subject
        .backend
        .list_tasks(&ListFilter::default())
        .await
        .unwrap();
    let ids: Vec<&str> = listed.iter().map(|r| r.row_key.as_str()).collect();
    assert_eq!(ids, [second.row_key.as_str(), record.row_key.as_str()]);

    let created = ListFilter {
        status: Some(Status::Completed),
        ..ListFilter::default()
    };
    assert!(subject
        .backend
        .list_tasks(&created)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(subject.backend.queue_length().await.unwrap(), 2);

    let duplicate = subject.backend.insert_task(&record).await;
    assert!(
        duplicate.is_err(),
        "a second insert of one task id must fail"
    );
}

async fn lease_hides_message_until_visibility_passes(subject: &Subject, mode: &str) {
    submit_new(subject, mode).await;
    let first = lease_one(subject, Duration::from_secs(1)).await;
    assert_eq!(first.dequeue_count, 1);
    assert!(subject
        .backend
        .lease(1, Duration::from_secs(1))
        .await
        .unwrap()
        .is_empty());

    tokio::time::sleep(Duration::from_millis(1_600)).await;
    let again = lease_one(subject, Duration::from_secs(30)).await;
    assert_eq!(again.message_id, first.message_id);
    assert_eq!(again.dequeue_count, 2);
    assert_ne!(again.pop_receipt, first.pop_receipt);
}

async fn stale_receipt_after_extend_is_fenced(subject: &Subject, mode: &str) {
    submit_new(subject, mode).await;
    let lease = lease_one(subject, Duration::from_secs(30)).await;
    let extended = subject
        .backend
        .extend(&lease, Duration::from_secs(30))
        .await
        .unwrap()
        .expect("the lease is held");
    assert_ne!(extended.pop_receipt, lease.pop_receipt);

    let stale = subject
        .backend
        .delete(std::slice::from_ref(&lease))
        .await
        .unwrap();
    assert_eq!(stale, [Fenced::LeaseLost]);
    let stale_extend = subject
        .backend
        .extend(&lease, Duration::from_secs(30))
        .await
        .unwrap();
    assert!(stale_extend.is_none());

    let again = subject
        .backend
        .extend(&extended, Duration::from_secs(30))
        .await
        .unwrap();
    let newest = again.expect("the newest receipt still holds the lease");
    let deleted = subject.backend.delete(&[newest]).await.unwrap();
    assert_eq!(deleted, [Fenced::Written]);
    assert_eq!(subject.backend.queue_length().await.unwrap(), 0);
}

async fn begin_attempt_is_fenced_after_takeover(subject: &Subject, mode: &str) {
    let record = submit_new(subject, mode).await;
    let old = lease_one(subject, Duration::from_secs(1)).await;
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    let new = lease_one(subject, Duration::from_secs(30)).await;

    let begun = subject
        .backend
        .begin_attempt(&new, &attempt_of(&record, &new))
        .await;
    assert_eq!(begun.unwrap(), Fenced::Written);
    let late = subject
        .backend
        .begin_attempt(&old, &attempt_of(&record, &old))
        .await;
    assert_eq!(late.unwrap(), Fenced::LeaseLost);

    let finish = Finish {
        lease: old,
        record: completed(&record),
        dead_letter: None,
    };
    assert_eq!(
        subject.backend.finish(&[finish]).await.unwrap(),
        [Fenced::LeaseLost]
    );
    let stored = subject
        .backend
        .get_task(None, &record.row_key)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.status, Status::Running);
    assert_eq!(stored.attempt, 2);
}

async fn finish_moves_record_and_deletes_message(subject: &Subject, mode: &str) {
    let record = submit_new(subject, mode).await;
    let lease = lease_one(subject, Duration::from_secs(30)).await;
    let start = attempt_of(&record, &lease);
    assert_eq!(
        subject.backend.begin_attempt(&lease, &start).await.unwrap(),
        Fenced::Written
    );
    let running = subject
        .backend
        .get_task(None, &record.row_key)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(running.status, Status::Running);
    assert_eq!(running.host_id.as_deref(), Some("host-a"));

    let extended = subject
        .backend
        .extend(&lease, Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    let mut done = completed(&running);
    done.fuel_used = Some(u64::MAX / 2);
    let finish = Finish {
        lease: extended,
        record: done.clone(),
        dead_letter: None,
    };
    assert_eq!(
        subject.backend.finish(&[finish]).await.unwrap(),
        [Fenced::Written]
    );

    let stored = subject
        .backend
        .get_task(None, &record.row_key)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored, done);
    assert_eq!(subject.backend.queue_length().await.unwrap(), 0);
    let active = ListFilter {
        status: Some(Status::Running),
        ..ListFilter::default()
    };
    assert!(subject
        .backend
        .list_tasks(&active)
        .await
        .unwrap()
        .is_empty());
}

async fn finish_dead_letters_message_then_requeue(subject: &Subject, mode: &str) {
    let record = submit_new(subject, mode).await;
    let lease = lease_one(subject, Duration::from_secs(30)).await;
    let start = attempt_of(&record, &lease);
    subject.backend.begin_attempt(&lease, &start).await.unwrap();
    let mut failed = record.clone();
    failed.status = Status::Error;
    failed.attempt = 1;
    failed.error_message = Some("guest trapped: wasm trap: unreachable".into());
    failed.end_time = Some(parse_time(&format_time(&chrono::Utc::now())).unwrap());
    failed.attempt_history.push(failed.current_attempt());
    let reason = "attempt 1 of 1 failed and no attempts are left: guest trapped";

    // A stale receipt writes neither the record nor the dead letter.
    let extended = subject
        .backend
        .extend(&lease, Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    let stale = Finish {
        lease,
        record: failed.clone(),
        dead_letter: Some(reason.into()),
    };
    assert_eq!(
        subject.backend.finish(&[stale]).await.unwrap(),
        [Fenced::LeaseLost]
    );
    assert!(subject
        .backend
        .list_dead_letters()
        .await
        .unwrap()
        .is_empty());

    let finish = Finish {
        lease: extended.clone(),
        record: failed.clone(),
        dead_letter: Some(reason.into()),
    };
    assert_eq!(
        subject.backend.finish(&[finish]).await.unwrap(),
        [Fenced::Written]
    );
    let stored = subject
        .backend
        .get_task(None, &record.row_key)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored, failed);
    assert_eq!(subject.backend.queue_length().await.unwrap(), 0);
    let letters = subject.backend.list_dead_letters().await.unwrap();
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(letter.body, extended.body);
    assert_eq!(letter.reason, reason);
    assert_eq!(letter.row_key.as_deref(), Some(record.row_key.as_str()));
    assert_eq!(letter.resource_id.as_deref(), Some("res-0001"));

    // Requeued, the task is CREATED again with its history, and its message is back.
    assert!(subject
        .backend
        .requeue_dead_letter(&letter.id)
        .await
        .unwrap());
    let reopened = subject
        .backend
        .get_task(None, &record.row_key)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reopened.status, Status::Created);
    assert_eq!(reopened.attempt, 1);
    assert_eq!(reopened.attempt_history, failed.attempt_history);
    let again = lease_one(subject, Duration::from_secs(30)).await;
    assert_eq!(again.body, extended.body);
}

async fn retry_stores_record_and_delays_message(subject: &Subject, mode: &str) {
    let record = submit_new(subject, mode).await;
    let lease = lease_one(subject, Duration::from_secs(30)).await;
    subject
        .backend
        .begin_attempt(&lease, &attempt_of(&record, &lease))
        .await
        .unwrap();

    let mut failed = record.clone();
    failed.status = Status::Created;
    failed.attempt = 1;
    failed.error_message = Some("trap: unreachable".into());
    let retried = subject
        .backend
        .retry(&lease, &failed, Duration::from_secs(1))
        .await;
    assert_eq!(retried.unwrap(), Fenced::Written);
    assert!(subject
        .backend
        .lease(1, Duration::from_secs(30))
        .await
        .unwrap()
        .is_empty());

    tokio::time::sleep(Duration::from_millis(1_600)).await;
    let next = lease_one(subject, Duration::from_secs(30)).await;
    assert_eq!(next.dequeue_count, 2);
    let stored = subject
        .backend
        .get_task(None, &record.row_key)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.status, Status::Created);
    assert_eq!(stored.error_message.as_deref(), Some("trap: unreachable"));

    let stale = subject
        .backend
        .retry(&lease, &failed, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(stale, Fenced::LeaseLost);
}

async fn dead_letter_then_requeue(subject: &Subject, mode: &str) {
    let record = submit_new(subject, mode).await;
    let lease = lease_one(subject, Duration::from_secs(30)).await;
    let mut failed = record.clone();
    failed.status = Status::Error;
    failed.error_message = Some("unknown activity type".into());
    subject.backend.finish_without_lease(&failed).await.unwrap();
    let moved = subject
        .backend
        .dead_letter(&lease, "unknown activity type")
        .await;
    assert_eq!(moved.unwrap(), Fenced::Written);
    assert_eq!(subject.backend.queue_length().await.unwrap(), 0);

    let letters = subject.backend.list_dead_letters().await.unwrap();
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(letter.body, lease.body);
    assert_eq!(letter.reason, "unknown activity type");
    assert_eq!(letter.dequeue_count, 1);
    assert_eq!(letter.row_key.as_deref(), Some(record.row_key.as_str()));

    assert!(subject
        .backend
        .requeue_dead_letter(&letter.id)
        .await
        .unwrap());
    assert!(!subject
        .backend
        .requeue_dead_letter(&letter.id)
        .await
        .unwrap());
    assert!(subject
        .backend
        .list_dead_letters()
        .await
        .unwrap()
        .is_empty());
    let again = lease_one(subject, Duration::from_secs(30)).await;
    assert_eq!(again.body, lease.body);
    let reopened = subject
        .backend
        .get_task(None, &record.row_key)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reopened.status, Status::Created);
    assert_eq!(reopened.error_message, None);

    let stale = subject.backend.dead_letter(&lease, "stale").await.unwrap();
    assert_eq!(stale, Fenced::LeaseLost);
}

async fn idempotency_key_reuse_checks_request(subject: &Subject, _mode: &str) {
    let key = format!("order-{}/#?", uuid::Uuid::new_v4());
    let options = StartOptions {
        idempotency_key: Some(key.clone()),
        ..StartOptions::default()
    };
    let start = |activity_type: &'static str, resource_id: &'static str, payload: &'static str| {
        subject.client.start_activity_with(
            activity_type,
            resource_id,
            payload.as_bytes(),
            None,
            &options,
        )
    };
    let first = start("multiply", "res-0001", r#"{"x": 1}"#).await.unwrap();
    // The same request, with the payload's JSON laid out differently, is the first task.
    let second = start("multiply", "res-0001", r#"{"x":1}"#).await.unwrap();
    assert_eq!(first, second);

    let changed = [
        ("multiply", "res-0001", r#"{"x": 2}"#, "different payload"),
        (
            "multiply",
            "res-0002",
            r#"{"x": 1}"#,
            r#"different resource id ("res-0001", not "res-0002")"#,
        ),
        (
            "double",
            "res-0001",
            r#"{"x": 1}"#,
            r#"different activity type ("multiply", not "double")"#,
        ),
    ];
    for (activity_type, resource_id, payload, difference) in changed {
        let error = start(activity_type, resource_id, payload)
            .await
            .unwrap_err();
        let bgw::Error::IdempotencyConflict {
            key: conflict_key,
            task_id,
            resource_id: existing_resource,
            ..
        } = &error
        else {
            panic!("{difference}: expected IdempotencyConflict, got {error:?}");
        };
        assert_eq!(conflict_key, &key, "{difference}");
        assert_eq!(task_id, &first, "{difference}");
        assert_eq!(existing_resource, "res-0001", "{difference}");
        let message = error.to_string();
        assert!(message.contains(difference), "{message}");
        assert!(message.contains(&first), "{message}");
    }

    assert_eq!(subject.backend.queue_length().await.unwrap(), 1);
    let listed = subject.client.list(&ListFilter::default()).await.unwrap();
    assert_eq!(listed.len(), 1, "only the first task is stored");
    assert_eq!(listed[0].input_payload, r#"{"x": 1}"#);
}

async fn cancel_queued_and_running_tasks(subject: &Subject, mode: &str) {
    let queued = submit_new(subject, mode).await;
    let outcome = subject
        .backend
        .request_cancel(None, &queued.row_key)
        .await
        .unwrap();
    assert_eq!(outcome, CancelOutcome::Cancelled);
    let stored = subject
        .backend
        .get_task(None, &queued.row_key)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.status, Status::Cancelled);
    let again = subject
        .backend
        .request_cancel(None, &queued.row_key)
        .await
        .unwrap();
    assert_eq!(again, CancelOutcome::AlreadyFinished(Status::Cancelled));

    let running = submit_new(subject, mode).await;
    begin_running(subject, &running).await;
    assert!(!subject
        .backend
        .cancel_requested("res-0001", &running.row_key)
        .await
        .unwrap());
    let outcome = subject
        .backend
        .request_cancel(Some("res-0001"), &running.row_key)
        .await;
    assert_eq!(outcome.unwrap(), CancelOutcome::Requested);
    assert!(subject
        .backend
        .cancel_requested("res-0001", &running.row_key)
        .await
        .unwrap());

    let missing = subject
        .backend
        .request_cancel(None, "no-such-task")
        .await
        .unwrap();
    assert_eq!(missing, CancelOutcome::NotFound);
}

async fn end_unstarted_leaves_running_task(subject: &Subject, mode: &str) {
    let queued = submit_new(subject, mode).await;
    let running = submit_new(subject, mode).await;
    begin_running(subject, &running).await;

    let ended = subject
        .backend
        .end_unstarted("res-0001", &running.row_key, Status::Error, "base64 body")
        .await
        .unwrap();
    assert!(!ended, "a running task is left to its attempt");
    let records = records_of(subject, &running.row_key).await;
    assert_eq!(records.len(), 1, "one record: {records:?}");
    assert_eq!(records[0].status, Status::Running);

    let ended = subject
        .backend
        .end_unstarted("res-0001", &queued.row_key, Status::Error, "base64 body")
        .await
        .unwrap();
    assert!(ended, "a CREATED task ends");
    let records = records_of(subject, &queued.row_key).await;
    assert_eq!(records.len(), 1, "one record: {records:?}");
    assert_eq!(records[0].status, Status::Error);
    assert_eq!(records[0].error_message.as_deref(), Some("base64 body"));
    assert!(records[0].end_time.is_some(), "{:?}", records[0]);

    let again = subject
        .backend
        .end_unstarted("res-0001", &queued.row_key, Status::Error, "again")
        .await
        .unwrap();
    assert!(!again, "a finished task keeps its outcome");
    let missing = subject
        .backend
        .end_unstarted("res-0001", "no-such-task", Status::Error, "base64 body")
        .await
        .unwrap();
    assert!(!missing);
}

/// `bgw cancel` ends a CREATED task without a lease, also while a daemon holds the lease
/// of its message, for example to look for a component. The daemon's later write under
/// that lease must neither bring the task back to the active table nor replace the
/// cancellation.
async fn cancel_of_leased_task_keeps_one_record(subject: &Subject, mode: &str) {
    let waiting = submit_new(subject, mode).await;
    let lease = lease_one(subject, Duration::from_secs(30)).await;
    let cancelled = subject
        .backend
        .request_cancel(None, &waiting.row_key)
        .await
        .unwrap();
    assert_eq!(cancelled, CancelOutcome::Cancelled);
    let mut looked = waiting.clone();
    looked.error_message = Some("no component registered yet".into());
    let retried = subject
        .backend
        .retry(&lease, &looked, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(retried, Fenced::Written);
    let records = records_of(subject, &waiting.row_key).await;
    assert_eq!(records.len(), 1, "one record after the retry: {records:?}");
    assert_eq!(records[0].status, Status::Cancelled);

    let failing = submit_new(subject, mode).await;
    let lease = lease_one(subject, Duration::from_secs(30)).await;
    assert!(lease.body.contains(&failing.row_key), "{}", lease.body);
    let cancelled = subject
        .backend
        .request_cancel(None, &failing.row_key)
        .await
        .unwrap();
    assert_eq!(cancelled, CancelOutcome::Cancelled);
    let mut failed = failing.clone();
    failed.status = Status::Error;
    failed.error_message = Some("no component registered within 30 s".into());
    let finish = Finish {
        lease,
        record: failed,
        dead_letter: None,
    };
    assert_eq!(
        subject.backend.finish(&[finish]).await.unwrap(),
        [Fenced::Written]
    );
    let records = records_of(subject, &failing.row_key).await;
    assert_eq!(records.len(), 1, "one record after the finish: {records:?}");
    assert_eq!(
        records[0].status,
        Status::Cancelled,
        "the cancellation stored first stays: {:?}",
        records[0]
    );
}

async fn registry_register_rollback_and_generation(subject: &Subject, _mode: &str) {
    let registry = subject.backend.registry();
    // The Azure registry table is shared by every test on one Azurite.
    let activity_type = format!("echo-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let before = registry.generation().await.unwrap();

    let wasm_one = b"\0asm one".to_vec();
    let wasm_two = b"\0asm two".to_vec();
    let digest = |bytes: &[u8]| hex::encode(Sha256::digest(bytes));
    let one = registry
        .register(
            &activity_type,
            &digest(&wasm_one),
            &wasm_one,
            "engine1",
            b"art1",
            LIMITS,
        )
        .await
        .unwrap();
    assert_eq!(one.version, 1);
    let two = registry
        .register(
            &activity_type,
            &digest(&wasm_two),
            &wasm_two,
            "engine1",
            b"art2",
            LIMITS,
        )
        .await
        .unwrap();
    assert_eq!(two.version, 2);
    assert!(registry.generation().await.unwrap() >= before + 2);

    let current = registry.current(&activity_type).await.unwrap().unwrap();
    assert_eq!(current, two);
    let versions = registry.versions(Some(&activity_type)).await.unwrap();
    let flags: Vec<(u32, bool)> = versions.iter().map(|v| (v.version, v.current)).collect();
    assert_eq!(flags, [(1, false), (2, true)]);

    let rolled = registry.rollback(&activity_type).await.unwrap();
    assert_eq!(rolled.version, 1);
    assert!(rolled.current);
    assert_eq!(
        registry
            .current(&activity_type)
            .await
            .unwrap()
            .unwrap()
            .digest,
        one.digest
    );
    let error = registry
        .rollback(&activity_type)
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("no earlier version"), "{error}");

    assert_eq!(registry.load_wasm(&one.digest).await.unwrap(), wasm_one);
    let path = registry
        .artifact_path(&two.digest, "engine1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(std::fs::read(path).unwrap(), b"art2");
    assert!(registry
        .artifact_path(&two.digest, "engine2")
        .await
        .unwrap()
        .is_none());
    let wrong = registry
        .register(
            &activity_type,
            &digest(b"other"),
            &wasm_one,
            "engine1",
            b"",
            LIMITS,
        )
        .await;
    assert!(
        wrong.is_err(),
        "a digest that does not match the bytes must be rejected"
    );
}

async fn registry_unregister_then_restore(subject: &Subject, _mode: &str) {
    let registry = subject.backend.registry();
    // The Azure registry table is shared by every test on one Azurite.
    let activity_type = format!("gone-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let register = |wasm: &'static [u8]| {
        let digest = hex::encode(Sha256::digest(wasm));
        let activity_type = activity_type.clone();
        async move {
            registry
                .register(&activity_type, &digest, wasm, "engine1", b"art", LIMITS)
                .await
                .unwrap()
        }
    };
    register(b"\0asm one").await;
    let two = register(b"\0asm two").await;

    let before = registry.generation().await.unwrap();
    let unregistered = registry.unregister(&activity_type).await.unwrap();
    assert_eq!(unregistered.version, 2);
    assert_eq!(unregistered.digest, two.digest);
    assert!(
        !unregistered.current,
        "the returned version is no longer current"
    );
    assert!(registry.generation().await.unwrap() > before);
    assert_eq!(registry.current(&activity_type).await.unwrap(), None);
    let flags: Vec<(u32, bool)> = registry
        .versions(Some(&activity_type))
        .await
        .unwrap()
        .iter()
        .map(|v| (v.version, v.current))
        .collect();
    assert_eq!(flags, [(1, false), (2, false)], "the history is kept");

    let again = registry.unregister(&activity_type).await.unwrap_err();
    assert!(
        again.to_string().contains("already unregistered"),
        "{again}"
    );
    let unknown_type = format!("{activity_type}-never");
    let unknown = registry.unregister(&unknown_type).await.unwrap_err();
    assert!(matches!(unknown, bgw::Error::NotFound(_)), "{unknown:?}");
    assert!(
        unknown
            .to_string()
            .contains(&format!("{unknown_type:?} is not registered")),
        "{unknown}"
    );
    let unknown = registry.rollback(&unknown_type).await.unwrap_err();
    assert!(matches!(unknown, bgw::Error::NotFound(_)), "{unknown:?}");

    // Rollback after unregister makes the version current again that was current then.
    let before = registry.generation().await.unwrap();
    let restored = registry.rollback(&activity_type).await.unwrap();
    assert_eq!(restored.version, 2);
    assert!(restored.current);
    assert!(registry.generation().await.unwrap() > before);
    assert_eq!(
        registry.current(&activity_type).await.unwrap(),
        Some(restored)
    );

    // A registration after unregister becomes current, and rollback then goes back from it.
    registry.unregister(&activity_type).await.unwrap();
    let three = register(b"\0asm three").await;
    assert_eq!(three.version, 3);
    assert_eq!(registry.current(&activity_type).await.unwrap(), Some(three));
    let rolled = registry.rollback(&activity_type).await.unwrap();
    assert_eq!(rolled.version, 2, "rollback goes to the version below 3");
}

async fn timestamps_round_trip(subject: &Subject, mode: &str) {
    let text = String::from_utf8(read_case("C15-timestamps.json")).unwrap();
    let cases: Value = serde_json::from_str(&text).unwrap();
    for value in cases["values"].as_array().unwrap() {
        let value = value.as_str().unwrap();
        let time = parse_time(value).unwrap_or_else(|error| panic!("{value:?}: {error}"));
        let record = submit_new(subject, mode).await;
        let mut finished = completed(&record);
        finished.start_time = Some(time);
        finished.end_time = Some(time);
        let written = subject.backend.finish_without_lease(&finished).await;

        // Azure Tables stores no time before 1601; SQLite stores any.
        if mode == "azure" && value.starts_with("1600") {
            let error = written.unwrap_err().to_string();
            assert!(error.contains("1601"), "{value:?}: {error}");
            continue;
        }
        written.unwrap_or_else(|error| panic!("{value:?}: {error}"));
        let stored = subject
            .backend
            .get_task(None, &record.row_key)
            .await
            .unwrap()
            .unwrap();
        // Both backends keep 100 ns, the precision of Azure's Edm.DateTime, and every case
        // value has at most seven fractional digits.
        assert_eq!(stored.start_time, Some(time), "{value:?}");
        assert_eq!(stored.end_time, Some(time), "{value:?}");
        // A value with seven digits and a `Z` formats back to the same text.
        let seven_digits = value
            .split_once('.')
            .is_some_and(|(_, fraction)| fraction.len() == "1234567Z".len());
        if seven_digits {
            assert_eq!(format_time(&stored.start_time.unwrap()), value);
        }
    }
}

async fn case_payloads_reach_record_intact(subject: &Subject, mode: &str) {
    let names = [
        "C05-payload-45000.json",
        "C05-payload-49500.json",
        "C05-payload-70000.json",
        "C05-payload-multibyte.json",
    ];
    for name in names {
        let case: Value = serde_json::from_slice(&read_case(name)).unwrap();
        let payload = serde_json::to_string(&case["payload"]).unwrap();
        let id = subject
            .client
            .start_activity("echo", "res-0005", payload.as_bytes(), None)
            .await
            .unwrap_or_else(|error| panic!("{name}: {error}"));
        let stored = subject.backend.get_task(None, &id).await.unwrap().unwrap();
        // NOTE: Azurite 3.35 decodes each chunk of a table request body on its own, so a
        // multibyte character that straddles a chunk boundary is stored as U+FFFD. The
        // 30,000 'é' of the multibyte case sometimes arrive in several chunks, so only
        // SQLite compares that text.
        let azurite_may_corrupt = mode == "azure" && name.contains("multibyte");
        assert!(
            azurite_may_corrupt || stored.input_payload == payload,
            "{name}: InputPayload differs"
        );

        let lease = lease_one(subject, Duration::from_secs(30)).await;
        let message = QueueMessage::parse(&lease.body).unwrap();
        assert_eq!(message.row_key, id, "{name}");
        let by_reference = message.payload.get("bgw_blob").is_some();
        // The 70000-byte payload and the multibyte one (escaped as \uXXXX) exceed the
        // 64 KiB of an Azure message, so their messages refer to a blob.
        let expect_reference =
            mode == "azure" && (name.contains("70000") || name.contains("multibyte"));
        assert_eq!(by_reference, expect_reference, "{name}: message payload");
        if !by_reference {
            assert_eq!(message.payload, case["payload"], "{name}: message payload");
        }
        subject.backend.delete(&[lease]).await.unwrap();
    }
}

async fn rejected_resource_ids_write_nothing(subject: &Subject, _mode: &str) {
    let cases: Value = serde_json::from_slice(&read_case("C04-resource-ids.json")).unwrap();
    for id in cases["resource_ids"].as_array().unwrap() {
        let id = id.as_str().unwrap();
        let expected = bgw::validate::resource_id(id).map_err(|error| error.to_string());
        let started = subject
            .client
            .start_activity("multiply", id, br#"{"x": 1}"#, None)
            .await
            .map_err(|error| error.to_string());
        match (&expected, &started) {
            (Err(wanted), Err(got)) => assert_eq!(got, wanted, "{id:?}"),
            (Ok(()), Ok(task_id)) => {
                let stored = subject.client.get_task(task_id, Some(id)).await.unwrap();
                assert_eq!(stored.unwrap().partition_key, id);
            }
            _ => {
                panic!("{id:?}: validation says {expected:?}, start_activity returned {started:?}")
            }
        }
    }
    let accepted = cases["resource_ids"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|id| bgw::validate::resource_id(id.as_str().unwrap()).is_ok())
        .count() as u64;
    assert_eq!(subject.backend.queue_length().await.unwrap(), accepted);
}

async fn blobs_put_open_and_delete(subject: &Subject, _mode: &str) {
    let blobs = subject.backend.blobs();
    let target = BlobRef {
        container: "bgw-input".into(),
        name: format!("{}/input", uuid::Uuid::new_v4()),
    };
    let data: Vec<u8> = (0..3 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let size = blobs.put(&target, &mut data.as_slice()).unwrap();
    assert_eq!(size, data.len() as u64);

    let (reader, size) = blobs.open(&target).unwrap();
    assert_eq!(size, data.len() as u64);
    let mut middle = [0u8; 16];
    let read = reader.read_at(1_000_000, &mut middle).unwrap();
    assert_eq!(read, 16);
    assert_eq!(&middle[..], &data[1_000_000..1_000_016]);

    let mut writer = blobs.create(&target).unwrap();
    std::io::Write::write_all(&mut writer, b"replaced").unwrap();
    writer.commit().unwrap();
    let (reader, size) = blobs.open(&target).unwrap();
    let mut text = vec![0u8; size as usize];
    reader.read_at(0, &mut text).unwrap();
    assert_eq!(text, b"replaced");

    blobs.delete(&target).unwrap();
    blobs.delete(&target).unwrap();
    assert!(blobs.open(&target).is_err());
}

async fn prune_deletes_old_finished_tasks(subject: &Subject, mode: &str) {
    let old = submit_new(subject, mode).await;
    let mut old_done = completed(&old);
    old_done.end_time = Some(parse_time("2020-01-01T00:00:00Z").unwrap());
    subject
        .backend
        .finish_without_lease(&old_done)
        .await
        .unwrap();
    let recent = submit_new(subject, mode).await;
    subject
        .backend
        .finish_without_lease(&completed(&recent))
        .await
        .unwrap();

    let cutoff = parse_time("2021-01-01T00:00:00Z").unwrap();
    let pruned = subject.backend.prune_finished(cutoff, 10).await.unwrap();
    let ids: Vec<&str> = pruned.iter().map(|r| r.row_key.as_str()).collect();
    assert_eq!(ids, [old.row_key.as_str()]);
    assert!(subject
        .backend
        .get_task(None, &old.row_key)
        .await
        .unwrap()
        .is_none());
    assert!(subject
        .backend
        .get_task(None, &recent.row_key)
        .await
        .unwrap()
        .is_some());
}

async fn bulk_submit_stores_tasks_in_order(subject: &Subject, mode: &str) {
    let key = format!("batch-{}", uuid::Uuid::new_v4());
    let payloads: Vec<String> = (0..5).map(|x| format!(r#"{{"x": {x}}}"#)).collect();
    let mut requests: Vec<StartRequest> = payloads
        .iter()
        .map(|payload| StartRequest::new("multiply", "res-0001", payload.as_bytes()))
        .collect();
    requests[1].options.idempotency_key = Some(key.clone());
    requests[3].payload_json = payloads[1].as_bytes();
    requests[3].options.idempotency_key = Some(key.clone());

    let task_ids = subject.client.start_activities(requests).await.unwrap();

    assert_eq!(task_ids.len(), 5);
    assert_eq!(
        task_ids[3], task_ids[1],
        "a repeated key returns the first task"
    );
    assert_eq!(subject.backend.queue_length().await.unwrap(), 4);
    for index in [0, 1, 2, 4] {
        let stored = subject
            .backend
            .get_task(Some("res-0001"), &task_ids[index])
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            stored.input_payload, payloads[index],
            "task at index {index}"
        );
        assert_eq!(stored.status, Status::Created, "task at index {index}");
    }

    let invalid = vec![
        StartRequest::new("multiply", "res-0001", b"{}"),
        StartRequest::new("multiply", "res-0001", b"{\"x\": "),
    ];
    let error = subject
        .client
        .start_activities(invalid)
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("index 1 of 2"), "{error}");
    assert_eq!(subject.backend.queue_length().await.unwrap(), 4);

    // A key reused with another payload stops the call at that request. SQLite stores none
    // of the tasks of that transaction; Azure stores the tasks before it, one by one.
    let mut conflicting = vec![
        StartRequest::new("multiply", "res-0001", b"{}"),
        StartRequest::new("multiply", "res-0001", b"{\"x\": 9}"),
    ];
    conflicting[1].options.idempotency_key = Some(key.clone());
    let error = subject
        .client
        .start_activities(conflicting)
        .await
        .unwrap_err();
    let (stored, source) = match error {
        bgw::Error::PartlySubmitted {
            task_ids, source, ..
        } => (task_ids.len(), *source),
        other => (0, other),
    };
    assert!(
        matches!(source, bgw::Error::IdempotencyConflict { .. }),
        "{source:?}"
    );
    let expected_stored = if mode == "azure" { 1 } else { 0 };
    assert_eq!(stored, expected_stored);
    assert_eq!(
        subject.backend.queue_length().await.unwrap(),
        4 + expected_stored as u64
    );
}

//! Tests of the SQLite backend against real database files in temporary folders.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use chrono::{SecondsFormat, Utc};
use rusqlite::Connection;
use sha2::{Digest, Sha256};

use super::{SqliteBackend, SqliteOptions};
use crate::backend::{
    AttemptStart, Backend, CancelOutcome, ComponentRegistry, Fenced, Finish, Lease, Limits,
    ListFilter, OutgoingMessage, ProgressUpdate, Submitted, TaskQueue, TaskStore,
};

/// Visibility timeout of leases in tests that lease more than once.
const VISIBILITY: Duration = Duration::from_secs(60);
use crate::record::{QueueMessage, Status, TaskRecord};
use crate::Error;

const CASES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/cases");

const LIMITS: Limits = Limits {
    fuel: 1_000,
    memory_mib: 64,
    timeout_secs: 5,
    max_output_bytes: 1024,
    retry: crate::backend::RetryPolicy {
        max_attempts: 3,
        backoff_ms: 1_000,
        max_backoff_ms: 60_000,
    },
};

fn open(dir: &Path) -> SqliteBackend {
    SqliteBackend::open(SqliteOptions::in_dir(dir)).unwrap()
}

fn new_record(resource_id: &str, task_type: &str) -> TaskRecord {
    let task_id = uuid::Uuid::now_v7().to_string();
    TaskRecord::new(&task_id, resource_id, task_type, r#"{"x": 1}"#)
}

fn message_for(record: &TaskRecord) -> OutgoingMessage {
    OutgoingMessage::new(&QueueMessage {
        resource_id: record.partition_key.clone(),
        row_key: record.row_key.clone(),
        task_type: record.task_type.clone(),
        payload: serde_json::from_str(&record.input_payload).unwrap(),
        store_mode: "sqlite".into(),
        active_table_name: "ActiveTasks".into(),
        finished_table_name: "FinishedTasks".into(),
        database_name: "bgw.db".into(),
    })
}

async fn submit_new(backend: &SqliteBackend, resource_id: &str) -> TaskRecord {
    let record = new_record(resource_id, "echo");
    backend
        .submit(&record, &message_for(&record))
        .await
        .unwrap();
    record
}

fn plain_message(body: &str) -> OutgoingMessage {
    OutgoingMessage {
        body: body.to_owned(),
        delay: Duration::ZERO,
    }
}

fn attempt_of(record: &TaskRecord, attempt: u32) -> AttemptStart {
    AttemptStart {
        resource_id: record.partition_key.clone(),
        task_id: record.row_key.clone(),
        attempt,
        component_digest: "d".repeat(64),
        component_version: 3,
        host_id: "host-a".into(),
        start_time: Utc::now(),
    }
}

fn completed(record: &TaskRecord) -> TaskRecord {
    TaskRecord {
        status: Status::Completed,
        output_payload: r#"{"y": 2}"#.into(),
        end_time: Some(Utc::now()),
        fuel_used: Some(42),
        ..record.clone()
    }
}

fn count_rows(dir: &Path, table: &str) -> i64 {
    let connection = Connection::open(dir.join("bgw.db")).unwrap();
    connection
        .query_row(&format!("SELECT count(*) FROM {table}"), [], |row| {
            row.get(0)
        })
        .unwrap()
}

fn invalid_message<T: std::fmt::Debug>(result: crate::Result<T>) -> String {
    match result {
        Err(Error::Invalid(message)) => message,
        other => panic!("expected Error::Invalid, got {other:?}"),
    }
}

async fn lease_one(backend: &SqliteBackend) -> Lease {
    let mut leases = backend.lease(1, Duration::from_secs(60)).await.unwrap();
    assert_eq!(leases.len(), 1, "expected one visible message");
    leases.pop().unwrap()
}

#[tokio::test]
async fn submit_then_get_and_list() {
    let dir = tempfile::tempdir().unwrap();
    let backend = open(dir.path());
    let first = submit_new(&backend, "res-0001").await;
    let second = submit_new(&backend, "res-0002").await;
    let mut third = new_record("res-0001", "resize");
    third.status = Status::Running;
    backend.submit(&third, &message_for(&third)).await.unwrap();

    let found = backend
        .get_task(Some("res-0001"), &first.row_key)
        .await
        .unwrap();
    assert_eq!(found.as_ref(), Some(&first));
    let by_id = backend.get_task(None, &second.row_key).await.unwrap();
    assert_eq!(by_id.as_ref(), Some(&second));
    let wrong_resource = backend
        .get_task(Some("res-0002"), &first.row_key)
        .await
        .unwrap();
    assert_eq!(wrong_resource, None);
    assert_eq!(backend.get_task(None, "missing").await.unwrap(), None);

    let all = backend.list_tasks(&ListFilter::default()).await.unwrap();
    let ids: Vec<&str> = all.iter().map(|record| record.row_key.as_str()).collect();
    assert_eq!(ids, [&third.row_key, &second.row_key, &first.row_key]);

    let by_resource = ListFilter {
        resource_id: Some("res-0001".into()),
        ..ListFilter::default()
    };
    assert_eq!(backend.list_tasks(&by_resource).await.unwrap().len(), 2);
    let by_type = ListFilter {
        task_type: Some("resize".into()),
        ..ListFilter::default()
    };
    assert_eq!(backend.list_tasks(&by_type).await.unwrap(), [third.clone()]);
    let by_status = ListFilter {
        status: Some(Status::Created),
        resource_id: Some("res-0001".into()),
        ..ListFilter::default()
    };
    assert_eq!(
        backend.list_tasks(&by_status).await.unwrap(),
        std::slice::from_ref(&first)
    );
    let limited = ListFilter {
        limit: Some(1),
        ..ListFilter::default()
    };
    assert_eq!(backend.list_tasks(&limited).await.unwrap(), [third.clone()]);

    assert_eq!(backend.queue_length().await.unwrap(), 3);
}

#[tokio::test]
async fn list_includes_finished_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let backend = open(dir.path());
    let done = submit_new(&backend, "res-0001").await;
    let waiting = submit_new(&backend, "res-0001").await;
    backend
        .finish_without_lease(&completed(&done))
        .await
        .unwrap();

    let all = backend.list_tasks(&ListFilter::default()).await.unwrap();
    let statuses: Vec<Status> = all.iter().map(|record| record.status).collect();
    assert_eq!(statuses, [Status::Created, Status::Completed]);
    assert_eq!(all[0].row_key, waiting.row_key);
    let finished_only = ListFilter {
        status: Some(Status::Completed),
        ..ListFilter::default()
    };
    assert_eq!(backend.list_tasks(&finished_only).await.unwrap().len(), 1);
}

#[tokio::test]
async fn duplicate_task_id_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let backend = open(dir.path());
    let record = submit_new(&backend, "res-0001").await;

    let again = backend.submit(&record, &message_for(&record)).await;
    let error = invalid_message(again);
    assert!(error.contains(&format!("{:?}", record.row_key)), "{error}");
    assert!(error.contains("already exists"), "{error}");
    assert_eq!(backend.queue_length().await.unwrap(), 1);

    // The same task id under another resource id is a duplicate too.
    let moved = TaskRecord {
        partition_key: "res-0002".into(),
        ..record.clone()
    };
    assert!(invalid_message(backend.insert_task(&moved).await).contains("already exists"));

    // So is a task id that only the finished table has.
    backend
        .finish_without_lease(&completed(&record))
        .await
        .unwrap();
    assert!(invalid_message(backend.insert_task(&record).await).contains("already exists"));
}

#[tokio::test]
async fn insert_and_delete_task() {
    let dir = tempfile::tempdir().unwrap();
    let backend = open(dir.path());
    let record = new_record("res-0001", "echo");
    backend.insert_task(&record).await.unwrap();
    assert_eq!(backend.queue_length().await.unwrap(), 0);
    assert!(backend
        .get_task(None, &record.row_key)
        .await
        .unwrap()
        .is_some());

    backend
        .delete_task("res-0001", &record.row_key)
        .await
        .unwrap();
    assert_eq!(backend.get_task(None, &record.row_key).await.unwrap(), None);
}

#[tokio::test]
async fn lease_hides_message_until_visibility_passes() {
    let dir = tempfile::tempdir().unwrap();
    let backend = open(dir.path());
    backend.enqueue(&[plain_message("one")]).await.unwrap();

    let visibility = Duration::from_millis(300);
    let leases = backend.lease(10, visibility).await.unwrap();
    assert_eq!(leases.len(), 1);
    assert_eq!(leases[0].body, "one");
    assert_eq!(leases[0].dequeue_count, 1);
    assert!(leases[0].visible_at > Utc::now());

    assert!(backend.lease(10, visibility).await.unwrap().is_empty());
    assert_eq!(backend.queue_length().await.unwrap(), 1);

    tokio::time::sleep(visibility + Duration::from_millis(50)).await;
    let again = backend.lease(10, visibility).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].message_id, leases[0].message_id);
    assert_eq!(again[0].dequeue_count, 2);
    assert_ne!(again[0].pop_receipt, leases[0].pop_receipt);
}

#[tokio::test]
async fn longest_visibility_leases_and_extends() {
    let dir = tempfile::tempdir().unwrap();
    let backend = open(dir.path());
    backend.enqueue(&[plain_message("forever")]).await.unwrap();

    let mut leases = backend.lease(1, Duration::MAX).await.unwrap();
    assert_eq!(leases.len(), 1);
    let lease = leases.pop().unwrap();
    assert!(lease.held_until > Instant::now() + Duration::from_secs(3600));

    let extended = backend.extend(&lease, Duration::MAX).await.unwrap();
    assert!(extended.is_some(), "the lease still holds");
    assert!(backend.lease(1, VISIBILITY).await.unwrap().is_empty());
}

#[tokio::test]
async fn lease_takes_oldest_first_up_to_max() {
    let dir = tempfile::tempdir().unwrap();
    let backend = open(dir.path());
    let messages: Vec<OutgoingMessage> = (0..5)
        .map(|index| plain_message(&format!("m{index}")))
        .collect();
    backend.enqueue(&messages).await.unwrap();
    let delayed = OutgoingMessage {
        body: "later".into(),
        delay: Duration::from_secs(60),
    };
    backend.enqueue(&[delayed]).await.unwrap();

    let first = backend.lease(3, Duration::from_secs(60)).await.unwrap();
    let bodies: Vec<&str> = first.iter().map(|lease| lease.body.as_str()).collect();
    assert_eq!(bodies, ["m0", "m1", "m2"]);
    let rest = backend.lease(10, Duration::from_secs(60)).await.unwrap();
    let bodies: Vec<&str> = rest.iter().map(|lease| lease.body.as_str()).collect();
    assert_eq!(bodies, ["m3", "m4"]);
    assert!(backend
        .lease(0, Duration::from_secs(60))
        .await
        .unwrap()
        .is_empty());
    assert_eq!(backend.queue_length().await.unwrap(), 6);
}

#[tokio::test]
async fn dequeue_count_increments_per_lease() {
    let dir = tempfile::tempdir().unwrap();
    let backend = open(dir.path());
    backend.enqueue(&[plain_message("retry me")]).await.unwrap();

    for expected in 1..=4 {
        let lease = lease_one(&backend).await;
        assert_eq!(lease.dequeue_count, expected);
        assert_eq!(
            backend.release(&lease, Duration::ZERO).await.unwrap(),
            Fenced::Written
        );
    }
}

#[tokio::test]
async fn release_delays_next_delivery() {
    let dir = tempfile::tempdir().unwrap();
    let backend = open(dir.path());
    backend.enqueue(&[plain_message("later")]).await.unwrap();

    let lease = lease_one(&backend).await;
    let delay = Duration::from_millis(300);
    assert_eq!(
        backend.release(&lease, delay).await.unwrap(),
        Fenced::Written
    );
    assert!(backend
        .lease(1, Duration::from_secs(60))
        .await
        .unwrap()
        .is_empty());
    // The release cleared the receipt, so the old lease no longer holds.
    assert_eq!(backend.delete(&[lease]).await.unwrap(), [Fenced::LeaseLost]);

    tokio::time::sleep(delay + Duration::from_millis(50)).await;
    assert_eq!(lease_one(&backend).await.dequeue_count, 2);
}

#[tokio::test]
async fn stale_receipt_after_extend_is_fenced() {
    let dir = tempfile::tempdir().unwrap();
    let backend = open(dir.path());
    let record = submit_new(&backend, "res-0001").await;
    let old = lease_one(&backend).await;

    let new = backend
        .extend(&old, Duration::from_secs(120))
        .await
        .unwrap()
        .expect("the lease holds");
    assert_ne!(new.pop_receipt, old.pop_receipt);
    assert_eq!(new.message_id, old.message_id);
    assert_eq!(new.dequeue_count, old.dequeue_count);
    assert!(new.visible_at > old.visible_at);

    let stale_finish = Finish {
        lease: old.clone(),
        record: completed(&record),
        dead_letter: None,
    };
    assert_eq!(
        backend.finish(&[stale_finish]).await.unwrap(),
        [Fenced::LeaseLost]
    );
    assert_eq!(
        backend.delete(std::slice::from_ref(&old)).await.unwrap(),
        [Fenced::LeaseLost]
    );
    let attempt = attempt_of(&record, 1);
    assert_eq!(
        backend.begin_attempt(&old, &attempt).await.unwrap(),
        Fenced::LeaseLost
    );
    assert_eq!(
        backend.release(&old, Duration::ZERO).await.unwrap(),
        Fenced::LeaseLost
    );
    assert_eq!(
        backend.dead_letter(&old, "stale").await.unwrap(),
        Fenced::LeaseLost
    );
    assert_eq!(
        backend.extend(&old, Duration::from_secs(1)).await.unwrap(),
        None
    );

    // Nothing the stale receipt tried was written.
    let stored = backend
        .get_task(None, &record.row_key)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.status, Status::Created);
    assert_eq!(backend.queue_length().await.unwrap(), 1);
    assert!(backend.list_dead_letters().await.unwrap().is_empty());

    assert_eq!(backend.delete(&[new]).await.unwrap(), [Fenced::Written]);
    assert_eq!(backend.queue_length().await.unwrap(), 0);
}

#[tokio::test]
async fn unknown_message_id_is_lease_lost() {
    let dir = tempfile::tempdir().unwrap();
    let backend = open(dir.path());
    backend.enqueue(&[plain_message("x")]).await.unwrap();
    let mut lease = lease_one(&backend).await;
    lease.message_id = "not-a-number".into();

    assert_eq!(
        backend.delete(&[lease.clone()]).await.unwrap(),
        [Fenced::LeaseLost]
    );
    assert_eq!(
        backend.release(&lease, Duration::ZERO).await.unwrap(),
        Fenced::LeaseLost
    );
    assert_eq!(backend.extend(&lease, Duration::ZERO).await.unwrap(), None);
}

#[tokio::test]
async fn begin_attempt_marks_task_running() {
    let dir = tempfile::tempdir().unwrap();
    let backend = open(dir.path());
    let record = submit_new(&backend, "res-0001").await;
    let lease = lease_one(&backend).await;

    let start = attempt_of(&record, 2);
    assert_eq!(
        backend.begin_attempt(&lease, &start).await.unwrap(),
        Fenced::Written
    );

    let stored = backend
        .get_task(None, &record.row_key)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.status, Status::Running);
    assert_eq!(stored.attempt, 2);
    assert_eq!(
        stored.component_digest.as_deref(),
        Some("d".repeat(64).as_str())
    );
    assert_eq!(stored.component_version, Some(3));
    assert_eq!(stored.host_id.as_deref(), Some("host-a"));
    let start_micros = start.start_time.timestamp_micros();
    assert_eq!(stored.start_time.unwrap().timestamp_micros(), start_micros);
    assert_eq!(stored.end_time, None);
    assert_eq!(stored.error_message, None);
}

#[tokio::test]
async fn begin_attempt_clears_earlier_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let backend = open(dir.path());
    let mut record = new_record("res-0001", "echo");
    record.end_time = Some(Utc::now());
    record.error_message = Some("earlier failure".into());
    backend
        .submit(&record, &message_for(&record))
        .await
        .unwrap();
    let lease = lease_one(&backend).await;

    let start = attempt_of(&record, 2);
    assert_eq!(
        backend.begin_attempt(&lease, &start).await.unwrap(),
        Fenced::Written
    );
    let stored = backend
        .get_task(None, &record.row_key)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.end_time, None);
    assert_eq!(stored.error_message, None);
}

#[tokio::test]
async fn begin_attempt_without_record_is_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let backend = open(dir.path());
    backend.enqueue(&[plain_message("orphan")]).await.unwrap();
    let lease = lease_one(&backend).await;
    let record = new_record("res-0001", "echo");

    match backend.begin_attempt(&lease, &attempt_of(&record, 1)).await {
        Err(Error::NotFound(message)) => assert!(message.contains(&record.row_key), "{message}"),
        other => panic!("expected NotFound, got {other:?}"),
    }
}

#[tokio::test]
async fn finish_moves_record_and_deletes_message() {
    let dir = tempfile::tempdir().unwrap();
    let backend = open(dir.path());
    let record = submit_new(&backend, "res-0001").await;
    let lease = lease_one(&backend).await;
    backend
        .begin_attempt(&lease, &attempt_of(&record, 1))
        .await
        .unwrap();

    let outcome = completed(&record);
    let finish = Finish {
        lease,
        record: outcome.clone(),
        dead_letter: None,
    };
    assert_eq!(backend.finish(&[finish]).await.unwrap(), [Fenced::Written]);

    let stored = backend
        .get_task(None, &record.row_key)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.status, Status::Completed);
    assert_eq!(stored.output_payload, r#"{"y": 2}"#);
    assert_eq!(stored.fuel_used, Some(42));
    assert_eq!(count_rows(dir.path(), "ActiveTasks"), 0);
    assert_eq!(count_rows(dir.path(), "FinishedTasks"), 1);
    assert_eq!(backend.queue_length().await.unwrap(), 0);
}

#[tokio::test]
async fn finish_batch_writes_only_held_leases() {
    let dir = tempfile::tempdir().unwrap();
    let backend = open(dir.path());
    let kept = submit_new(&backend, "res-0001").await;
    let lost = submit_new(&backend, "res-0002").await;
    let leases = backend.lease(2, Duration::from_secs(60)).await.unwrap();
    assert_eq!(leases.len(), 2);
    // Another consumer took over the second message.
    let renewed = backend
        .extend(&leases[1], Duration::from_secs(60))
        .await
        .unwrap();
    assert!(renewed.is_some());

    let finishes = [
        Finish {
            lease: leases[0].clone(),
            record: completed(&kept),
            dead_letter: None,
        },
        Finish {
            lease: leases[1].clone(),
            record: completed(&lost),
            dead_letter: None,
        },
    ];
    let outcome = backend.finish(&finishes).await.unwrap();
    assert_eq!(outcome, [Fenced::Written, Fenced::LeaseLost]);

    let kept_now = backend
        .get_task(None, &kept.row_key)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(kept_now.status, Status::Completed);
    let lost_now = backend
        .get_task(None, &lost.row_key)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(lost_now.status, Status::Created);
    assert_eq!(count_rows(dir.path(), "FinishedTasks"), 1);
    assert_eq!(backend.queue_length().await.unwrap(), 1);
}

#[tokio::test]
async fn finish_without_lease_keeps_queue() {
    let dir = tempfile::tempdir().unwrap();
    let backend = open(dir.path());
    let record = submit_new(&backend, "res-0001").await;
    let cancelled = TaskRecord {
        status: Status::Cancelled,
        end_time: Some(Utc::now()),
        ..record.clone()
    };
    backend.finish_without_lease(&cancelled).await.unwrap();
    // A second write replaces the first instead of failing.
    backend.finish_without_lease(&cancelled).await.unwrap();

    let stored = backend
        .get_task(None, &record.row_key)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.status, Status::Cancelled);
    assert_eq!(count_rows(dir.path(), "ActiveTasks"), 0);
    assert_eq!(count_rows(dir.path(), "FinishedTasks"), 1);
    assert_eq!(backend.queue_length().await.unwrap(), 1);
}

#[tokio::test]
async fn progress_updates_active_record() {
    let dir = tempfile::tempdir().unwrap();
    let backend = open(dir.path());
    let record = submit_new(&backend, "res-0001").await;
    let update = ProgressUpdate {
        resource_id: record.partition_key.clone(),
        task_id: record.row_key.clone(),
        percent: 150,
        message: "almost".into(),
    };
    backend.update_progress(&[update]).await.unwrap();

    let stored = backend
        .get_task(None, &record.row_key)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.progress, Some(100));
    assert_eq!(stored.progress_message.as_deref(), Some("almost"));
}

#[tokio::test]
async fn dead_letter_then_requeue() {
    let dir = tempfile::tempdir().unwrap();
    let backend = open(dir.path());
    let record = submit_new(&backend, "res-0001").await;
    let lease = lease_one(&backend).await;
    let reason = "guest trapped: unreachable";
    assert_eq!(
        backend.dead_letter(&lease, reason).await.unwrap(),
        Fenced::Written
    );
    let failed = TaskRecord {
        status: Status::Error,
        end_time: Some(Utc::now()),
        error_message: Some(reason.into()),
        attempt: 1,
        ..record.clone()
    };
    backend.finish_without_lease(&failed).await.unwrap();
    assert_eq!(backend.queue_length().await.unwrap(), 0);

    let letters = backend.list_dead_letters().await.unwrap();
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(letter.body, lease.body);
    assert_eq!(letter.reason, reason);
    assert_eq!(letter.dequeue_count, 1);
    assert_eq!(letter.row_key.as_deref(), Some(record.row_key.as_str()));
    assert_eq!(letter.resource_id.as_deref(), Some("res-0001"));
    assert!(letter.dead_lettered_at <= Utc::now());

    assert!(backend.requeue_dead_letter(&letter.id).await.unwrap());
    assert!(backend.list_dead_letters().await.unwrap().is_empty());
    assert!(!backend.requeue_dead_letter(&letter.id).await.unwrap());

    let reopened = backend
        .get_task(None, &record.row_key)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reopened.status, Status::Created);
    assert_eq!(reopened.end_time, None);
    assert_eq!(reopened.error_message, None);
    assert_eq!(reopened.attempt, 1);
    assert_eq!(count_rows(dir.path(), "ActiveTasks"), 1);
    assert_eq!(count_rows(dir.path(), "FinishedTasks"), 0);

    let again = lease_one(&backend).await;
    assert_eq!(again.body, lease.body);
    assert_eq!(again.dequeue_count, 1);
}

#[tokio::test]
async fn requeue_keeps_completed_record() {
    let dir = tempfile::tempdir().unwrap();
    let backend = open(dir.path());
    let record = submit_new(&backend, "res-0001").await;
    let lease = lease_one(&backend).await;
    backend
        .dead_letter(&lease, "duplicate delivery")
        .await
        .unwrap();
    backend
        .finish_without_lease(&completed(&record))
        .await
        .unwrap();

    let letter = backend.list_dead_letters().await.unwrap().remove(0);
    assert!(backend.requeue_dead_letter(&letter.id).await.unwrap());
    let stored = backend
        .get_task(None, &record.row_key)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.status, Status::Completed);
    assert_eq!(backend.queue_length().await.unwrap(), 1);
}

#[tokio::test]
async fn dead_letter_of_unreadable_body() {
    let dir = tempfile::tempdir().unwrap();
    let backend = open(dir.path());
    backend
        .enqueue(&[plain_message("{not json")])
        .await
        .unwrap();
    let lease = lease_one(&backend).await;
    backend
        .dead_letter(&lease, "invalid queue message")
        .await
        .unwrap();

    let letter = backend.list_dead_letters().await.unwrap().remove(0);
    assert_eq!(letter.body, "{not json");
    assert_eq!(letter.row_key, None);
    assert_eq!(letter.resource_id, None);
    assert!(!backend.requeue_dead_letter("999999").await.unwrap());
    match backend.requeue_dead_letter("no-such-id").await {
        Err(Error::Invalid(message)) => assert!(
            message.starts_with("invalid dead letter id \"no-such-id\""),
            "{message}"
        ),
        other => panic!("expected Error::Invalid, got {other:?}"),
    }
    assert!(backend.requeue_dead_letter(&letter.id).await.unwrap());
    assert_eq!(lease_one(&backend).await.body, "{not json");
}

#[tokio::test]
async fn registry_register_rollback_and_generation() {
    let dir = tempfile::tempdir().unwrap();
    let backend = open(dir.path());
    assert_eq!(backend.generation().await.unwrap(), 0);
    assert_eq!(backend.current("echo").await.unwrap(), None);

    let wasm_v1 = b"\0asm version one".to_vec();
    let digest_v1 = hex::encode(Sha256::digest(&wasm_v1));
    let v1 = backend
        .register(
            "echo",
            &digest_v1,
            &wasm_v1,
            "engine1",
            b"compiled one",
            LIMITS,
        )
        .await
        .unwrap();
    assert_eq!(v1.version, 1);
    assert!(v1.current);
    assert_eq!(v1.limits, LIMITS);
    assert_eq!(backend.generation().await.unwrap(), 1);
    assert_eq!(backend.current("echo").await.unwrap(), Some(v1.clone()));

    let wasm_v2 = b"\0asm version two".to_vec();
    let digest_v2 = hex::encode(Sha256::digest(&wasm_v2));
    let v2 = backend
        .register(
            "echo",
            &digest_v2,
            &wasm_v2,
            "engine1",
            b"compiled two",
            LIMITS,
        )
        .await
        .unwrap();
    assert_eq!(v2.version, 2);
    assert_eq!(backend.generation().await.unwrap(), 2);
    assert_eq!(backend.current("echo").await.unwrap(), Some(v2.clone()));

    let versions = backend.versions(Some("echo")).await.unwrap();
    let summary: Vec<(u32, bool)> = versions.iter().map(|v| (v.version, v.current)).collect();
    assert_eq!(summary, [(1, false), (2, true)]);

    let restored = backend.rollback("echo").await.unwrap();
    assert_eq!(restored.version, 1);
    assert_eq!(restored.digest, digest_v1);
    assert!(restored.current);
    assert_eq!(backend.generation().await.unwrap(), 3);
    assert_eq!(backend.current("echo").await.unwrap().unwrap().version, 1);

    let error = invalid_message(backend.rollback("echo").await);
    assert!(error.contains("\"echo\""), "{error}");
    assert!(error.contains("version 1"), "{error}");
    assert_eq!(backend.generation().await.unwrap(), 3);
}

#[tokio::test]
async fn registry_stores_files_by_digest() {
    let dir = tempfile::tempdir().unwrap();
    let backend = open(dir.path());
    let wasm = b"\0asm component".to_vec();
    let digest = hex::encode(Sha256::digest(&wasm));
    backend
        .register("echo", &digest, &wasm, "engine1", b"compiled", LIMITS)
        .await
        .unwrap();

    assert_eq!(backend.load_wasm(&digest).await.unwrap(), wasm);
    let components = dir.path().join("components");
    assert!(components.join(format!("{digest}.wasm")).is_file());
    let artifact = backend
        .artifact_path(&digest, "engine1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(artifact, components.join(format!("{digest}-engine1.cwasm")));
    assert_eq!(std::fs::read(&artifact).unwrap(), b"compiled");
    assert_eq!(
        backend.artifact_path(&digest, "engine2").await.unwrap(),
        None
    );

    let stored = backend
        .store_artifact(&digest, "engine2", b"other")
        .await
        .unwrap();
    assert_eq!(std::fs::read(&stored).unwrap(), b"other");
    let found = backend.artifact_path(&digest, "engine2").await.unwrap();
    assert_eq!(found, Some(stored));

    let leftovers: Vec<_> = std::fs::read_dir(&components)
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .filter(|name| name.to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    let unknown = "0".repeat(64);
    assert!(matches!(
        backend.load_wasm(&unknown).await,
        Err(Error::NotFound(_))
    ));
    assert!(invalid_message(backend.load_wasm("../etc/passwd").await).contains("digest"));
    let bad_hash = backend.artifact_path(&digest, "../x").await;
    assert!(invalid_message(bad_hash).contains("engine hash"));
}

#[tokio::test]
async fn registry_rejects_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let backend = open(dir.path());
    let wasm = b"\0asm component".to_vec();
    let digest = hex::encode(Sha256::digest(&wasm));

    let wrong_digest = "a".repeat(64);
    let result = backend
        .register("echo", &wrong_digest, &wasm, "e", b"", LIMITS)
        .await;
    let error = invalid_message(result);
    assert!(error.contains("does not match"), "{error}");
    assert!(error.contains(&digest), "{error}");

    let result = backend
        .register("bad type", &digest, &wasm, "e", b"", LIMITS)
        .await;
    assert!(invalid_message(result).contains("activity type"));

    let huge = Limits {
        fuel: u64::MAX,
        ..LIMITS
    };
    let result = backend
        .register("echo", &digest, &wasm, "e", b"", huge)
        .await;
    assert!(invalid_message(result).contains("fuel"));

    assert_eq!(backend.generation().await.unwrap(), 0);
    assert!(backend.versions(None).await.unwrap().is_empty());
    match backend.rollback("echo").await {
        Err(Error::NotFound(message)) => assert!(message.contains("\"echo\""), "{message}"),
        other => panic!("expected NotFound, got {other:?}"),
    }
}

#[tokio::test]
async fn registry_versions_of_all_types() {
    let dir = tempfile::tempdir().unwrap();
    let backend = open(dir.path());
    for activity_type in ["echo", "resize", "echo"] {
        let wasm = format!("\0asm {activity_type}").into_bytes();
        let digest = hex::encode(Sha256::digest(&wasm));
        backend
            .register(activity_type, &digest, &wasm, "e", b"", LIMITS)
            .await
            .unwrap();
    }
    let all = backend.versions(None).await.unwrap();
    let summary: Vec<(&str, u32, bool)> = all
        .iter()
        .map(|v| (v.activity_type.as_str(), v.version, v.current))
        .collect();
    assert_eq!(
        summary,
        [("echo", 1, false), ("resize", 1, true), ("echo", 2, true)]
    );
}

#[test]
fn two_backends_lease_each_message_once() {
    const MESSAGES: usize = 400;
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let first = open(dir.path());
    let second = open(dir.path());
    let messages: Vec<OutgoingMessage> = (0..MESSAGES)
        .map(|index| plain_message(&format!("m{index}")))
        .collect();
    runtime.block_on(first.enqueue(&messages)).unwrap();

    let backends = [&first, &second, &first, &second];
    let start = std::sync::Barrier::new(backends.len());
    let leased: Vec<Vec<String>> = std::thread::scope(|scope| {
        let workers: Vec<_> = backends
            .iter()
            .map(|backend| {
                let handle = runtime.handle().clone();
                let start = &start;
                scope.spawn(move || {
                    let mut bodies = Vec::new();
                    start.wait();
                    loop {
                        let leases = handle
                            .block_on(backend.lease(3, Duration::from_secs(600)))
                            .unwrap();
                        if leases.is_empty() {
                            return bodies;
                        }
                        bodies.extend(leases.into_iter().map(|lease| lease.body));
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|worker| worker.join().unwrap())
            .collect()
    });

    let mut times_leased: HashMap<String, usize> = HashMap::new();
    for body in leased.iter().flatten() {
        *times_leased.entry(body.clone()).or_default() += 1;
    }
    assert_eq!(times_leased.len(), MESSAGES);
    let twice: Vec<_> = times_leased
        .iter()
        .filter(|(_, &count)| count > 1)
        .collect();
    assert!(twice.is_empty(), "leased more than once: {twice:?}");
}

#[tokio::test]
async fn lease_and_begin_starts_accepted_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let backend = open(dir.path());
    let accepted = submit_new(&backend, "res-0001").await;
    let declined = submit_new(&backend, "res-0001").await;
    backend
        .enqueue(&[plain_message("not a task message")])
        .await
        .unwrap();

    let accepted_id = accepted.row_key.clone();
    let decide: std::sync::Arc<crate::backend::BeginDecision> = std::sync::Arc::new(
        move |_: &Lease, message: &QueueMessage, record: &TaskRecord| {
            let token: Box<dyn std::any::Any + Send> = Box::new(7u32);
            (message.row_key == accepted_id).then(|| (attempt_of(record, 1), token))
        },
    );
    let tasks = backend
        .lease_and_begin(10, VISIBILITY, decide)
        .await
        .unwrap();

    assert_eq!(tasks.len(), 3);
    let begun: Vec<_> = tasks
        .iter()
        .filter_map(|task| task.begun.as_ref())
        .collect();
    assert_eq!(begun.len(), 1);
    assert_eq!(begun[0].record.row_key, accepted.row_key);
    assert_eq!(begun[0].start.attempt, 1);
    assert_eq!(begun[0].token.downcast_ref::<u32>(), Some(&7));
    let stored = backend
        .get_task(None, &accepted.row_key)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.status, Status::Running);
    assert_eq!(stored.host_id.as_deref(), Some("host-a"));
    let untouched = backend
        .get_task(None, &declined.row_key)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(untouched.status, Status::Created);
}

#[test]
fn list_indexes_only_on_finished_table() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bgw.db");
    drop(open(dir.path()));
    // A file made by an earlier version, which had these indexes in both tables.
    Connection::open(&path)
        .unwrap()
        .execute_batch(
            "CREATE INDEX ActiveTasks_end_time ON ActiveTasks (end_time);
             CREATE INDEX ActiveTasks_created_time ON ActiveTasks (created_time);
             CREATE INDEX ActiveTasks_status_created_time
                 ON ActiveTasks (status, created_time);",
        )
        .unwrap();

    drop(open(dir.path()));

    let check = Connection::open(&path).unwrap();
    let index_exists = |name: &str| -> bool {
        check
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'index' AND name = ?1",
                [name],
                |row| row.get::<_, i64>(0),
            )
            .unwrap()
            > 0
    };
    for index in ["end_time", "created_time", "status_created_time"] {
        assert!(
            !index_exists(&format!("ActiveTasks_{index}")),
            "ActiveTasks_{index} is dropped"
        );
        assert!(
            index_exists(&format!("FinishedTasks_{index}")),
            "FinishedTasks_{index} exists"
        );
    }
}

#[test]
fn python_schema_gains_extra_columns() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bgw.db");
    let python = Connection::open(&path).unwrap();
    for table in ["ActiveTasks", "FinishedTasks"] {
        python
            .execute_batch(&format!(
                "CREATE TABLE {table} (
                    resource_id TEXT, row_key TEXT, task_type TEXT, status TEXT,
                    input_payload TEXT, output_payload TEXT, start_time TEXT, end_time TEXT,
                    batch_id TEXT, error_message TEXT, container_name TEXT, blob_name TEXT,
                    PRIMARY KEY(resource_id, row_key))"
            ))
            .unwrap();
    }
    python
        .execute(
            "INSERT INTO ActiveTasks VALUES
                 ('res-0001', 'task-1', 'multiply', 'RUNNING', '{\"x\": 2}', NULL,
                  '2014-09-02T21:09:14.884854', NULL, 'batch-7', NULL, NULL, NULL)",
            [],
        )
        .unwrap();
    python
        .execute(
            "INSERT INTO FinishedTasks VALUES
                 ('res-0001', 'task-0', 'multiply', 'COMPLETED', '{}', '{\"y\": 4}',
                  NULL, '2014-09-02T21:10:00+00:00', '', NULL, 'inputs', 'a.bin')",
            [],
        )
        .unwrap();
    drop(python);

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let backend = open(dir.path());

    let check = Connection::open(&path).unwrap();
    for table in ["ActiveTasks", "FinishedTasks"] {
        let mut statement = check
            .prepare(&format!("PRAGMA table_info({table})"))
            .unwrap();
        let columns: Vec<String> = statement
            .query_map([], |row| row.get(1))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let expected: Vec<&str> = super::schema::task_column_names().collect();
        assert_eq!(columns, expected, "{table}");
    }
    // The Python library reads rows by position: the first twelve values are unchanged.
    let (status, batch): (String, String) = check
        .query_row("SELECT * FROM ActiveTasks", [], |row| {
            Ok((row.get(3)?, row.get(8)?))
        })
        .unwrap();
    assert_eq!((status.as_str(), batch.as_str()), ("RUNNING", "batch-7"));

    let running = runtime
        .block_on(backend.get_task(None, "task-1"))
        .unwrap()
        .unwrap();
    assert_eq!(running.status, Status::Running);
    assert_eq!(running.batch_id, "batch-7");
    assert_eq!(running.output_payload, "");
    assert_eq!(running.attempt, 0);
    assert_eq!(running.created_time, None);
    let start = running.start_time.unwrap();
    assert_eq!(
        start.to_rfc3339_opts(SecondsFormat::Micros, true),
        "2014-09-02T21:09:14.884854Z"
    );

    let done = runtime
        .block_on(backend.get_task(Some("res-0001"), "task-0"))
        .unwrap()
        .unwrap();
    assert_eq!(done.status, Status::Completed);
    assert_eq!(done.blob_name.as_deref(), Some("a.bin"));
    let all = runtime
        .block_on(backend.list_tasks(&ListFilter::default()))
        .unwrap();
    assert_eq!(all.len(), 2);

    // Opening again finds every column in place.
    drop(backend);
    let reopened = open(dir.path());
    assert!(runtime
        .block_on(reopened.get_task(None, "task-1"))
        .unwrap()
        .is_some());
}

#[test]
fn foreign_table_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let connection = Connection::open(dir.path().join("bgw.db")).unwrap();
    connection
        .execute_batch("CREATE TABLE ActiveTasks (id INTEGER)")
        .unwrap();
    drop(connection);

    let error = invalid_message(SqliteBackend::open(SqliteOptions::in_dir(dir.path())).map(|_| ()));
    assert!(error.contains("ActiveTasks"), "{error}");
    assert!(error.contains("resource_id"), "{error}");
}

#[test]
fn open_checks_table_and_queue_names() {
    let dir = tempfile::tempdir().unwrap();
    let with = |active: &str, finished: &str, queue: &str| SqliteOptions {
        active_table: active.into(),
        finished_table: finished.into(),
        queue_name: queue.into(),
        ..SqliteOptions::in_dir(dir.path())
    };
    let open_error = |options| invalid_message(SqliteBackend::open(options).map(|_| ()));

    assert!(open_error(with("Active; DROP", "Finished", "bgw-tasks")).contains("table name"));
    assert!(open_error(with("Tasks", "tasks", "bgw-tasks")).contains("must differ"));
    assert!(open_error(with("Active", "Finished", "Bad_Queue")).contains("queue name"));
}

#[tokio::test]
async fn custom_names_keep_queues_apart() {
    let dir = tempfile::tempdir().unwrap();
    let custom = SqliteBackend::open(SqliteOptions {
        active_table: "TenantActive".into(),
        finished_table: "TenantFinished".into(),
        queue_name: "tenant-queue".into(),
        ..SqliteOptions::in_dir(dir.path())
    })
    .unwrap();
    let default = open(dir.path());
    assert_eq!(custom.table_names(), ("TenantActive", "TenantFinished"));

    let record = submit_new(&custom, "res-0001").await;
    assert_eq!(custom.queue_length().await.unwrap(), 1);
    assert_eq!(default.queue_length().await.unwrap(), 0);
    assert!(default
        .lease(10, Duration::from_secs(1))
        .await
        .unwrap()
        .is_empty());
    assert_eq!(default.get_task(None, &record.row_key).await.unwrap(), None);
    assert_eq!(count_rows(dir.path(), "TenantActive"), 1);
}

#[tokio::test]
async fn stored_timestamps_read_and_round_trip() {
    let text = std::fs::read_to_string(format!("{CASES}/C15-timestamps.json")).unwrap();
    let cases: serde_json::Value = serde_json::from_str(&text).unwrap();
    let values: Vec<&str> = cases["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|value| value.as_str().unwrap())
        .collect();
    // Each value with the time it must read back as, in RFC 3339 with nanoseconds, and the
    // text the store writes for that time.
    let expected: HashMap<&str, (&str, &str)> = HashMap::from([
        (
            "2014-09-02T21:09:14.8848547Z",
            (
                "2014-09-02T21:09:14.884854700Z",
                "2014-09-02T21:09:14.8848547Z",
            ),
        ),
        (
            "2014-09-02T21:09:14Z",
            (
                "2014-09-02T21:09:14.000000000Z",
                "2014-09-02T21:09:14.000000Z",
            ),
        ),
        (
            "2014-09-02T21:09:14.884854+00:00",
            (
                "2014-09-02T21:09:14.884854000Z",
                "2014-09-02T21:09:14.884854Z",
            ),
        ),
        (
            "2014-09-02T21:09:14.884854",
            (
                "2014-09-02T21:09:14.884854000Z",
                "2014-09-02T21:09:14.884854Z",
            ),
        ),
        (
            "1601-01-01T00:00:00Z",
            (
                "1601-01-01T00:00:00.000000000Z",
                "1601-01-01T00:00:00.000000Z",
            ),
        ),
        (
            "1600-12-31T23:59:59Z",
            (
                "1600-12-31T23:59:59.000000000Z",
                "1600-12-31T23:59:59.000000Z",
            ),
        ),
        (
            "9999-12-31T23:59:59.9999999Z",
            (
                "9999-12-31T23:59:59.999999900Z",
                "9999-12-31T23:59:59.9999999Z",
            ),
        ),
        (
            "2024-02-29T23:59:59.9999999Z",
            (
                "2024-02-29T23:59:59.999999900Z",
                "2024-02-29T23:59:59.9999999Z",
            ),
        ),
        // chrono keeps a leap second as 23:59:59 plus a second of nanoseconds.
        (
            "2016-12-31T23:59:60Z",
            (
                "2016-12-31T23:59:60.000000000Z",
                "2016-12-31T23:59:60.000000Z",
            ),
        ),
    ]);
    assert_eq!(values.len(), expected.len());

    let dir = tempfile::tempdir().unwrap();
    let backend = open(dir.path());
    let connection = Connection::open(dir.path().join("bgw.db")).unwrap();
    for value in values {
        let (read_as, written_as) = expected[value];
        let record = submit_new(&backend, "res-0001").await;
        connection
            .execute(
                "UPDATE ActiveTasks SET start_time = ?1 WHERE row_key = ?2",
                [value, record.row_key.as_str()],
            )
            .unwrap();

        let stored = backend.get_task(None, &record.row_key).await;
        let stored = stored
            .unwrap_or_else(|error| panic!("{value:?}: {error}"))
            .unwrap();
        let read_back = stored
            .start_time
            .map(|time| time.to_rfc3339_opts(SecondsFormat::Nanos, true));
        assert_eq!(read_back.as_deref(), Some(read_as), "{value:?}");

        // Written back by the store, the time keeps its 100 ns digit.
        let mut finished = stored.clone();
        finished.status = Status::Completed;
        finished.end_time = stored.start_time;
        backend.finish_without_lease(&finished).await.unwrap();
        let text: String = connection
            .query_row(
                "SELECT end_time FROM FinishedTasks WHERE row_key = ?1",
                [record.row_key.as_str()],
                |row| row.get(0),
            )
            .unwrap();
        assert_eq!(text, written_as, "{value:?}");
        let again = backend
            .get_task(None, &record.row_key)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(again.start_time, stored.start_time, "{value:?}");
        assert_eq!(again.end_time, stored.start_time, "{value:?}");
    }
}

#[tokio::test]
async fn unreadable_time_reads_as_none() {
    let dir = tempfile::tempdir().unwrap();
    let backend = open(dir.path());
    let record = submit_new(&backend, "res-0001").await;
    let connection = Connection::open(dir.path().join("bgw.db")).unwrap();
    connection
        .execute(
            "UPDATE ActiveTasks SET start_time = 'yesterday', end_time = 17 WHERE row_key = ?1",
            [&record.row_key],
        )
        .unwrap();

    let stored = backend
        .get_task(None, &record.row_key)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.start_time, None);
    assert_eq!(stored.end_time, None);
    assert_eq!(stored.status, Status::Created);
}

#[tokio::test]
async fn unknown_status_names_task_and_value() {
    let dir = tempfile::tempdir().unwrap();
    let backend = open(dir.path());
    let record = submit_new(&backend, "res-0001").await;
    let connection = Connection::open(dir.path().join("bgw.db")).unwrap();
    connection
        .execute(
            "UPDATE ActiveTasks SET status = 'DONE' WHERE row_key = ?1",
            [&record.row_key],
        )
        .unwrap();

    let error = invalid_message(backend.get_task(None, &record.row_key).await);
    assert!(error.contains(&record.row_key), "{error}");
    assert!(error.contains("\"DONE\""), "{error}");
}

#[tokio::test]
async fn busy_database_is_retried_then_reported() {
    let dir = tempfile::tempdir().unwrap();
    let backend = SqliteBackend::open(SqliteOptions {
        busy_timeout: Duration::from_millis(300),
        ..SqliteOptions::in_dir(dir.path())
    })
    .unwrap();
    let blocker = Connection::open(dir.path().join("bgw.db")).unwrap();
    blocker.execute_batch("BEGIN EXCLUSIVE").unwrap();

    let started = Instant::now();
    let record = new_record("res-0001", "echo");
    let error = backend
        .submit(&record, &message_for(&record))
        .await
        .unwrap_err();
    let message = error.to_string();
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(message.contains("SQLITE_BUSY"), "{message}");
    assert!(message.contains("stayed busy"), "{message}");

    blocker.execute_batch("ROLLBACK").unwrap();
    backend
        .submit(&record, &message_for(&record))
        .await
        .unwrap();
}

#[tokio::test]
async fn short_lock_is_waited_out() {
    let dir = tempfile::tempdir().unwrap();
    let backend = open(dir.path());
    let path = dir.path().join("bgw.db");
    let (locked, wait_locked) = std::sync::mpsc::channel();
    let holder = std::thread::spawn(move || {
        let blocker = Connection::open(path).unwrap();
        blocker.execute_batch("BEGIN EXCLUSIVE").unwrap();
        locked.send(()).unwrap();
        // Longer than SQLite's own busy handler waits, so the retry loop must take over.
        std::thread::sleep(Duration::from_millis(1500));
        blocker.execute_batch("COMMIT").unwrap();
    });
    wait_locked.recv().unwrap();

    let record = submit_new(&backend, "res-0001").await;
    holder.join().unwrap();
    assert!(backend
        .get_task(None, &record.row_key)
        .await
        .unwrap()
        .is_some());
}

#[tokio::test]
async fn wait_for_change_wakes_on_commit() {
    let dir = tempfile::tempdir().unwrap();
    let waiter = open(dir.path());
    let writer = open(dir.path());
    // A change made before the wait began ends the next wait at once.
    writer.enqueue(&[plain_message("before")]).await.unwrap();
    let started = Instant::now();
    waiter.wait_for_change(Duration::from_secs(5)).await;
    assert!(started.elapsed() < Duration::from_secs(1));

    let started = Instant::now();
    waiter.wait_for_change(Duration::from_millis(200)).await;
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(200), "{waited:?}");

    let enqueue = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        writer.enqueue(&[plain_message("during")]).await.unwrap();
    };
    let started = Instant::now();
    tokio::join!(waiter.wait_for_change(Duration::from_secs(5)), enqueue);
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(100), "{waited:?}");
    assert!(waited < Duration::from_secs(2), "{waited:?}");
}

#[tokio::test]
async fn retry_stores_created_and_delays_message() {
    let dir = tempfile::tempdir().unwrap();
    let backend = open(dir.path());
    let record = submit_new(&backend, "res-0001").await;
    let lease = lease_one(&backend).await;
    backend
        .begin_attempt(&lease, &attempt_of(&record, 1))
        .await
        .unwrap();

    let mut failed = record.clone();
    failed.status = Status::Created;
    failed.error_message = Some("attempt 1 of 3 failed".into());
    let delay = Duration::from_millis(300);
    assert_eq!(
        backend.retry(&lease, &failed, delay).await.unwrap(),
        Fenced::Written
    );

    let stored = backend
        .get_task(None, &record.row_key)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.status, Status::Created);
    assert_eq!(
        stored.error_message.as_deref(),
        Some("attempt 1 of 3 failed")
    );
    assert!(
        backend.lease(1, VISIBILITY).await.unwrap().is_empty(),
        "the retry waits"
    );
    tokio::time::sleep(delay + Duration::from_millis(100)).await;
    let again = backend.lease(1, VISIBILITY).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].dequeue_count, 2);
    assert_eq!(
        backend.retry(&lease, &failed, delay).await.unwrap(),
        Fenced::LeaseLost,
        "the old lease can no longer retry"
    );
}

#[tokio::test]
async fn cancel_request_wins_over_retry() {
    let dir = tempfile::tempdir().unwrap();
    let backend = open(dir.path());
    let record = submit_new(&backend, "res-0001").await;
    let lease = lease_one(&backend).await;
    backend
        .begin_attempt(&lease, &attempt_of(&record, 1))
        .await
        .unwrap();
    assert_eq!(
        backend.request_cancel(None, &record.row_key).await.unwrap(),
        CancelOutcome::Requested
    );
    assert!(backend
        .cancel_requested(&record.partition_key, &record.row_key)
        .await
        .unwrap());

    let mut failed = record.clone();
    failed.status = Status::Created;
    failed.error_message = Some("retryable error: busy".into());
    backend
        .retry(&lease, &failed, Duration::ZERO)
        .await
        .unwrap();

    let stored = backend
        .get_task(None, &record.row_key)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.status, Status::Cancelled);
    assert!(stored
        .error_message
        .unwrap()
        .contains("retryable error: busy"));
    assert_eq!(count_rows(dir.path(), "bgw_queue"), 0);
    assert_eq!(count_rows(dir.path(), "ActiveTasks"), 0);
}

#[tokio::test]
async fn cancel_of_queued_task_is_immediate() {
    let dir = tempfile::tempdir().unwrap();
    let backend = open(dir.path());
    let record = submit_new(&backend, "res-0001").await;
    assert_eq!(
        backend
            .request_cancel(Some("res-0001"), &record.row_key)
            .await
            .unwrap(),
        CancelOutcome::Cancelled
    );
    let stored = backend
        .get_task(None, &record.row_key)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.status, Status::Cancelled);
    assert_eq!(
        backend.request_cancel(None, &record.row_key).await.unwrap(),
        CancelOutcome::AlreadyFinished(Status::Cancelled)
    );
    let unknown = uuid::Uuid::now_v7().to_string();
    assert_eq!(
        backend.request_cancel(None, &unknown).await.unwrap(),
        CancelOutcome::NotFound
    );
}

#[tokio::test]
async fn idempotency_key_returns_first_task() {
    let dir = tempfile::tempdir().unwrap();
    let backend = open(dir.path());
    let mut first = new_record("res-0001", "echo");
    first.idempotency_key = Some("order-17".into());
    assert_eq!(
        backend.submit(&first, &message_for(&first)).await.unwrap(),
        Submitted::Created
    );
    let mut second = new_record("res-0001", "echo");
    second.idempotency_key = Some("order-17".into());
    assert_eq!(
        backend
            .submit(&second, &message_for(&second))
            .await
            .unwrap(),
        Submitted::Existing {
            task_id: first.row_key.clone(),
            resource_id: "res-0001".into()
        }
    );
    let mut other_resource = new_record("res-0002", "echo");
    other_resource.idempotency_key = Some("order-17".into());
    let error = backend
        .submit(&other_resource, &message_for(&other_resource))
        .await
        .unwrap_err();
    assert!(
        matches!(&error, Error::IdempotencyConflict { task_id, .. } if *task_id == first.row_key),
        "{error:?}"
    );
    assert_eq!(count_rows(dir.path(), "bgw_queue"), 1, "one message only");
    assert!(backend
        .get_task(None, &second.row_key)
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn begin_attempts_batch_reports_each_item() {
    let dir = tempfile::tempdir().unwrap();
    let backend = open(dir.path());
    let first = submit_new(&backend, "res-0001").await;
    let second = submit_new(&backend, "res-0002").await;
    let leases = backend.lease(2, VISIBILITY).await.unwrap();
    assert_eq!(leases.len(), 2);
    let mut missing = attempt_of(&second, 1);
    missing.task_id = uuid::Uuid::now_v7().to_string();
    let results = backend
        .begin_attempts(&[
            (leases[0].clone(), attempt_of(&first, 1)),
            (leases[1].clone(), missing),
        ])
        .await
        .unwrap();
    assert!(matches!(results[0], Ok(Fenced::Written)));
    assert!(matches!(results[1], Err(Error::NotFound(_))));
    let stored = backend
        .get_task(None, &first.row_key)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.status, Status::Running);
}

// ---- bulk submit through the client ----

/// Opens a client on the backend in `dir`, so that bulk tests go through validation and
/// blobs.
fn bulk_client(dir: &Path) -> crate::client::WorkflowClient {
    crate::client::WorkflowClient::new(std::sync::Arc::new(open(dir)), "bgw.db")
}

/// Number of files under the blob folder of `dir`, in every container.
fn count_blobs(dir: &Path) -> usize {
    fn count(path: &Path) -> usize {
        let Ok(entries) = std::fs::read_dir(path) else {
            return 0;
        };
        entries
            .map(|entry| entry.unwrap().path())
            .map(|path| if path.is_dir() { count(&path) } else { 1 })
            .sum()
    }
    count(&dir.join("blobs"))
}

/// Task ids of the queue's messages, in the order they were enqueued.
fn queued_task_ids(dir: &Path) -> Vec<String> {
    let connection = Connection::open(dir.join("bgw.db")).unwrap();
    let mut statement = connection
        .prepare("SELECT body FROM bgw_queue ORDER BY id")
        .unwrap();
    let bodies: Vec<String> = statement
        .query_map([], |row| row.get(0))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    bodies
        .iter()
        .map(|body| QueueMessage::parse(body).unwrap().row_key)
        .collect()
}

/// Makes every insert of a queue message whose body contains `"poison"` fail, so that the
/// transaction that writes it fails after the writes before it in that transaction.
fn poison_queue(dir: &Path) {
    let connection = Connection::open(dir.join("bgw.db")).unwrap();
    connection
        .execute_batch(
            "CREATE TRIGGER poison BEFORE INSERT ON bgw_queue
             WHEN NEW.body LIKE '%poison%'
             BEGIN SELECT RAISE(ABORT, 'poisoned message'); END;",
        )
        .unwrap();
}

#[tokio::test]
async fn bulk_submit_rejects_invalid_task_by_index() {
    let long_key = "k".repeat(crate::client::MAX_IDEMPOTENCY_KEY_BYTES + 1);
    let deep_payload = format!("{}{}", "{\"a\":".repeat(65), "}".repeat(65));
    // (activity type, resource id, payload, idempotency key, expected part of the message)
    let cases: [(&str, &str, &str, Option<&str>, &str); 6] = [
        (
            "multiply",
            "res",
            "{\"x\":",
            None,
            "payload is not valid JSON",
        ),
        (
            "multiply",
            "res",
            "[1]",
            None,
            "payload must be a JSON object",
        ),
        ("multiply", "res", &deep_payload, None, "limit of 64 levels"),
        (
            "multiply",
            "a/b",
            "{}",
            None,
            "resource id \"a/b\" contains '/'",
        ),
        (
            "-multiply",
            "res",
            "{}",
            None,
            "activity type \"-multiply\" starts with '-'",
        ),
        (
            "multiply",
            "res",
            "{}",
            Some(&long_key),
            "idempotency key of 257 bytes",
        ),
    ];
    for (activity_type, resource_id, payload, key, expected) in cases {
        let dir = tempfile::tempdir().unwrap();
        let client = bulk_client(dir.path());
        let mut blobs: Vec<&[u8]> = vec![b"zero", b"one", b"two"];
        let mut requests = Vec::new();
        for data in blobs.iter_mut() {
            let mut request = crate::client::StartRequest::new("multiply", "res", b"{}");
            request.blob = Some(crate::client::InputBlob {
                container: None,
                name: None,
                data,
            });
            requests.push(request);
        }
        let mut bad =
            crate::client::StartRequest::new(activity_type, resource_id, payload.as_bytes());
        bad.options.idempotency_key = key.map(str::to_owned);
        requests.insert(2, bad);

        let message = invalid_message(client.start_activities(requests).await);

        assert!(message.contains("index 2 of 4"), "{message}");
        assert!(message.contains(expected), "{message}");
        assert_eq!(count_rows(dir.path(), "ActiveTasks"), 0, "{message}");
        assert_eq!(count_rows(dir.path(), "bgw_queue"), 0, "{message}");
        assert_eq!(count_blobs(dir.path()), 0, "{message}");
    }
}

#[tokio::test]
async fn bulk_submit_stores_every_record_and_message() {
    let dir = tempfile::tempdir().unwrap();
    let client = bulk_client(dir.path());
    let payloads: Vec<String> = (0..2_500).map(|x| format!("{{\"x\":{x}}}")).collect();
    let requests = payloads
        .iter()
        .map(|payload| crate::client::StartRequest::new("multiply", "res", payload.as_bytes()))
        .collect();

    let task_ids = client.start_activities(requests).await.unwrap();

    assert_eq!(task_ids.len(), 2_500);
    assert_eq!(count_rows(dir.path(), "ActiveTasks"), 2_500);
    assert_eq!(queued_task_ids(dir.path()), task_ids);
    for (task_id, payload) in task_ids.iter().zip(&payloads).step_by(499) {
        let record = client
            .get_task(task_id, Some("res"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&record.input_payload, payload);
        assert_eq!(record.status, Status::Created);
    }
}

#[tokio::test]
async fn failed_bulk_transaction_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let client = bulk_client(dir.path());
    poison_queue(dir.path());
    let payloads = ["{\"x\":1}", "{\"x\":2}", "{\"poison\":true}", "{\"x\":4}"];
    let mut blobs: Vec<&[u8]> = vec![b"a", b"b", b"c", b"d"];
    let requests = payloads
        .iter()
        .zip(blobs.iter_mut())
        .map(|(payload, data)| {
            let mut request =
                crate::client::StartRequest::new("multiply", "res", payload.as_bytes());
            request.blob = Some(crate::client::InputBlob {
                container: None,
                name: None,
                data,
            });
            request
        })
        .collect();

    let error = client.start_activities(requests).await.unwrap_err();

    assert!(error.to_string().contains("poisoned message"), "{error}");
    assert!(!matches!(error, Error::PartlySubmitted { .. }), "{error}");
    assert_eq!(count_rows(dir.path(), "ActiveTasks"), 0);
    assert_eq!(count_rows(dir.path(), "bgw_queue"), 0);
    assert_eq!(count_blobs(dir.path()), 0);
}

#[tokio::test]
async fn failed_later_transaction_keeps_earlier_ones() {
    let dir = tempfile::tempdir().unwrap();
    let client = bulk_client(dir.path());
    poison_queue(dir.path());
    let mut payloads: Vec<String> = (0..1_500).map(|x| format!("{{\"x\":{x}}}")).collect();
    payloads[1_200] = "{\"poison\":true}".into();
    let mut blobs: Vec<Vec<u8>> = (0..1_500)
        .map(|x| format!("blob {x}").into_bytes())
        .collect();
    let mut readers: Vec<&[u8]> = blobs.iter_mut().map(|blob| blob.as_slice()).collect();
    let requests = payloads
        .iter()
        .zip(readers.iter_mut())
        .map(|(payload, data)| {
            let mut request =
                crate::client::StartRequest::new("multiply", "res", payload.as_bytes());
            request.blob = Some(crate::client::InputBlob {
                container: None,
                name: None,
                data,
            });
            request
        })
        .collect();

    let error = client.start_activities(requests).await.unwrap_err();

    let Error::PartlySubmitted {
        task_ids,
        total,
        source,
    } = error
    else {
        panic!("expected Error::PartlySubmitted, got {error:?}");
    };
    assert_eq!(total, 1_500);
    assert_eq!(task_ids.len(), 1_000);
    assert!(source.to_string().contains("poisoned message"), "{source}");
    assert_eq!(count_rows(dir.path(), "ActiveTasks"), 1_000);
    assert_eq!(queued_task_ids(dir.path()), task_ids);
    assert_eq!(count_blobs(dir.path()), 1_000);
    let last = client
        .get_task(&task_ids[999], Some("res"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(last.input_payload, "{\"x\":999}");
}

/// Requests of `multiply` tasks for resource `res`, each with an idempotency key and an input
/// blob read from its reader.
fn keyed_requests<'a>(
    keys: &[&str],
    readers: &'a mut [&'static [u8]],
) -> Vec<crate::client::StartRequest<'a>> {
    keys.iter()
        .zip(readers.iter_mut())
        .map(|(key, data)| {
            let mut request = crate::client::StartRequest::new("multiply", "res", b"{}");
            request.options.idempotency_key = Some((*key).to_owned());
            request.blob = Some(crate::client::InputBlob {
                container: None,
                name: None,
                data,
            });
            request
        })
        .collect()
}

#[tokio::test]
async fn bulk_idempotency_keys_return_existing_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let client = bulk_client(dir.path());
    let mut first_blobs: [&[u8]; 3] = [b"first k1", b"k2", b"second k1"];
    let mut second_blobs: [&[u8]; 2] = [b"k2 again", b"k3"];

    let first = client
        .start_activities(keyed_requests(&["k1", "k2", "k1"], &mut first_blobs))
        .await
        .unwrap();
    let second = client
        .start_activities(keyed_requests(&["k2", "k3"], &mut second_blobs))
        .await
        .unwrap();

    assert_eq!(first[2], first[0]);
    assert_ne!(first[1], first[0]);
    assert_eq!(second[0], first[1]);
    assert_eq!(count_rows(dir.path(), "ActiveTasks"), 3);
    assert_eq!(
        queued_task_ids(dir.path()),
        [first[0].clone(), first[1].clone(), second[1].clone()]
    );
    // Only the blobs of the three created tasks remain, each with its own data.
    assert_eq!(count_blobs(dir.path()), 3);
    let stored = client
        .get_task(&first[0], Some("res"))
        .await
        .unwrap()
        .unwrap();
    let blob = crate::backend::BlobRef {
        container: stored.container_name.unwrap(),
        name: stored.blob_name.unwrap(),
    };
    let path = client.backend().blobs().local_path(&blob).unwrap();
    assert_eq!(std::fs::read(path).unwrap(), b"first k1");
}

/// Returns an input blob named `orders/order-9.csv` that reads `data`.
fn named_blob<'a>(data: &'a mut &'static [u8]) -> crate::client::InputBlob<'a> {
    crate::client::InputBlob {
        container: None,
        name: Some("orders/order-9.csv".into()),
        data,
    }
}

#[tokio::test]
async fn retried_submit_keeps_named_blob_of_existing_task() {
    let dir = tempfile::tempdir().unwrap();
    let client = bulk_client(dir.path());
    let options = crate::client::StartOptions {
        idempotency_key: Some("order-9".into()),
        ..Default::default()
    };
    let (mut first_data, mut retry_data, mut bulk_data): (&[u8], &[u8], &[u8]) =
        (b"order nine", b"order nine", b"order nine");

    let first = client
        .start_activity_with(
            "multiply",
            "res",
            b"{}",
            Some(named_blob(&mut first_data)),
            &options,
        )
        .await
        .unwrap();
    // A retry of the same submit, as after a timeout: the same key and blob name.
    let retried = client
        .start_activity_with(
            "multiply",
            "res",
            b"{}",
            Some(named_blob(&mut retry_data)),
            &options,
        )
        .await
        .unwrap();
    let mut request = crate::client::StartRequest::new("multiply", "res", b"{}");
    request.options = options.clone();
    request.blob = Some(named_blob(&mut bulk_data));
    let bulk = client.start_activities(vec![request]).await.unwrap();

    assert_eq!(retried, first);
    assert_eq!(bulk, std::slice::from_ref(&first));
    let stored = client.get_task(&first, Some("res")).await.unwrap().unwrap();
    let blob = crate::backend::BlobRef {
        container: stored.container_name.unwrap(),
        name: stored.blob_name.unwrap(),
    };
    let path = client.backend().blobs().local_path(&blob).unwrap();
    assert_eq!(std::fs::read(path).unwrap(), b"order nine");
}

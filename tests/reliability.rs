//! Reliability promises of the daemon: retries, dead letters, cancellation, delays,
//! deadlines, idempotency keys, graceful shutdown, sandbox containment and submits whose
//! writes the store rejects. Each test runs the real `bgw` binary and daemon on its own
//! data directory, most of them twice: as `sqlite::NAME` on SQLite and as `azure::NAME` on
//! Azurite with its own tables and queue. Messages that the CLI cannot produce are
//! enqueued through the library, as another producer sharing the store would.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use bgw::backend::{BlobRef, Fenced, OutgoingMessage};
use bgw::client::{InputBlob, StartOptions, WorkflowClient, INPUT_CONTAINER};
use bgw::record::TaskRecord;
use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use support::faults::{Action, Fault, Request, Service, StoreFaults};
use support::{guest, output_of, path_str, runtime, TaskTable, TestEnv};

support::on_both_backends!(
    retryable_error_retried_to_max_attempts,
    error_kinds_decide_retry,
    max_attempts_above_delivery_limit,
    retry_defaults_and_backoff_cap,
    new_component_reaches_retrying_task,
    poison_messages_dead_lettered_healthy_completes,
    requeued_task_gets_one_extra_attempt,
    base64_body_dead_lettered_raw_completes,
    cancel_queued_running_finished_and_unknown,
    cancel_while_waiting_for_slot_never_runs,
    queued_tasks_outlast_busy_workers,
    busy_cores_never_stop_intake,
    duplicate_delivery_keeps_completed_record,
    delayed_task_waits_and_past_time_starts_now,
    idempotency_key_creates_one_task,
    deadlines_end_tasks_with_reason,
    deadline_passes_while_waiting_for_slot,
    lease_renewals_keep_one_attempt,
    tasks_leased_ahead_keep_leases,
    sigterm_lets_running_task_finish,
    grace_over_releases_task_at_once,
    second_signal_exits_at_once,
    sandbox_denies_files_env_and_network,
    blob_task_reads_only_its_own_input,
    rejected_submit_writes_leave_nothing,
);

/// Maximum wait for a handful of tasks. Generous, because the tests share few cores.
const TASK_TIMEOUT: Duration = Duration::from_secs(60);

/// Time a cancelled guest gets before it is interrupted, `bgw::daemon::CANCEL_GRACE`.
const CANCEL_GRACE: Duration = bgw::daemon::CANCEL_GRACE;

/// Directory of the failure-case data: inputs that broke similar systems.
const CASES_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/cases");

/// Reads a case data file. Panics when it is missing, so a case never passes without it.
fn case_file(name: &str) -> String {
    let path = Path::new(CASES_DIR).join(name);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|error| panic!("failed to read case data file {}: {error}", path.display()))
}

fn status_of(record: &Value) -> &str {
    record["Status"].as_str().unwrap_or("<no Status>")
}

fn error_of(record: &Value) -> &str {
    record["ErrorMessage"].as_str().unwrap_or("")
}

/// Checks that a task ended with `status` and an error message containing `expected`.
fn assert_ended_with(record: &Value, status: &str, expected: &str) {
    assert_eq!(status_of(record), status, "record: {record:#}");
    assert!(
        error_of(record).contains(expected),
        "ErrorMessage should contain {expected:?}: {record:#}"
    );
}

/// Parses a time field of a record or an attempt summary.
fn time_of(value: &Value, field: &str) -> DateTime<Utc> {
    let text = value[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} is missing: {value:#}"));
    DateTime::parse_from_rfc3339(text)
        .unwrap_or_else(|error| panic!("{field} {text:?} is not RFC 3339: {error}"))
        .with_timezone(&Utc)
}

fn seconds_between(earlier: DateTime<Utc>, later: DateTime<Utc>) -> f64 {
    (later - earlier).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6
}

fn history_of(record: &Value) -> &Vec<Value> {
    record["AttemptHistory"]
        .as_array()
        .unwrap_or_else(|| panic!("AttemptHistory is not an array: {record:#}"))
}

/// Returns the digest of the version record that `bgw register --json` printed.
fn digest_of(version: &Value) -> String {
    version["digest"]
        .as_str()
        .unwrap_or_else(|| panic!("no digest in {version:#}"))
        .to_owned()
}

/// Inserts a CREATED record with a chosen task id through the library, for messages that
/// name a task id fixed by a case file.
fn insert_record(env: &TestEnv, task_id: &str, resource_id: &str, task_type: &str, payload: &str) {
    let backend = env.backend();
    let record = TaskRecord::new(task_id, resource_id, task_type, payload);
    runtime()
        .block_on(backend.insert_task(&record))
        .unwrap_or_else(|error| panic!("failed to insert the record of task {task_id}: {error}"));
}

/// Enqueues raw message bodies through the library, visible at once.
fn enqueue_raw(env: &TestEnv, bodies: &[&str]) {
    let backend = env.backend();
    let messages: Vec<OutgoingMessage> = bodies
        .iter()
        .map(|body| OutgoingMessage {
            body: (*body).to_owned(),
            delay: Duration::ZERO,
        })
        .collect();
    runtime()
        .block_on(backend.enqueue(&messages))
        .expect("failed to enqueue raw messages");
}

/// Returns the dead letter whose body is `body`, if any.
fn dead_letter_with_body(env: &TestEnv, body: &str) -> Option<Value> {
    env.dead_letters_json()
        .into_iter()
        .find(|letter| letter["Body"] == body)
}

fn reason_of(letter: &Value) -> &str {
    letter["Reason"].as_str().unwrap_or("")
}

// Retries

fn retryable_error_retried_to_max_attempts(env: TestEnv) {
    let version = env.register(
        "flaky",
        &guest("hostile"),
        &["--max-attempts", "3", "--backoff", "0.4"],
    );
    let digest = digest_of(&version);
    let _daemon = env.start_daemon(&["--concurrency", "2"]);

    let id = env.submit(
        "flaky",
        r#"{"mode": "retryable", "message": "try later"}"#,
        &[],
    );
    let record = env.wait_one(&id, TASK_TIMEOUT);
    assert_ended_with(&record, "ERROR", "retryable error: try later");
    assert_eq!(record["Attempt"], 3, "three attempts in all: {record:#}");

    let history = history_of(&record);
    assert_eq!(
        history.len(),
        3,
        "one history entry per attempt: {record:#}"
    );
    for (index, entry) in history.iter().enumerate() {
        assert_eq!(
            entry["Attempt"],
            index + 1,
            "attempt numbers count up: {entry:#}"
        );
        assert_eq!(
            entry["ComponentDigest"],
            digest.as_str(),
            "each attempt names the digest: {entry:#}"
        );
        assert!(
            entry["ErrorMessage"]
                .as_str()
                .unwrap_or("")
                .contains("retryable error: try later"),
            "each attempt names its error: {entry:#}"
        );
    }

    // The delay before attempt n + 1 is the backoff doubled n - 1 times, times a jitter
    // factor of at least 0.5: here at least 0.2 s and 0.4 s.
    let first_gap = seconds_between(
        time_of(&history[0], "EndTime"),
        time_of(&history[1], "StartTime"),
    );
    let second_gap = seconds_between(
        time_of(&history[1], "EndTime"),
        time_of(&history[2], "StartTime"),
    );
    assert!(
        first_gap >= 0.2,
        "first retry waited {first_gap} s, less than 0.5 x 0.4 s"
    );
    assert!(
        second_gap >= 0.4,
        "second retry waited {second_gap} s, less than 0.5 x 0.8 s"
    );
    assert!(
        first_gap < 3.0,
        "first retry waited {first_gap} s for a 0.4 s backoff"
    );
}

fn error_kinds_decide_retry(env: TestEnv) {
    env.register(
        "hostile",
        &guest("hostile"),
        &["--max-attempts", "3", "--backoff", "0.05"],
    );
    let _daemon = env.start_daemon(&["--concurrency", "2"]);

    // (payload, status, error, attempts)
    let cases = [
        (
            r#"{"mode": "invalid-input", "message": "bad x"}"#,
            "invalid input: bad x",
            1,
        ),
        (
            r#"{"mode": "failed", "message": "gave up"}"#,
            "failed: gave up",
            1,
        ),
        (r#"{"mode": "trap"}"#, "guest trapped", 3),
    ];
    let ids: Vec<String> = cases
        .iter()
        .map(|(payload, _, _)| env.submit("hostile", payload, &[]))
        .collect();
    let records = env.wait_all(&ids, TASK_TIMEOUT);
    for ((payload, error, attempts), id) in cases.iter().zip(&ids) {
        let record = &records[id];
        assert_ended_with(record, "ERROR", error);
        assert_eq!(
            record["Attempt"], *attempts,
            "attempts of {payload}: {record:#}"
        );
        assert_eq!(
            history_of(record).len(),
            *attempts,
            "history entries of {payload}: {record:#}"
        );
    }

    // Only the trap, a retryable failure whose attempts are used up, is dead-lettered.
    let letters = env.dead_letters_json();
    assert_eq!(letters.len(), 1, "{letters:#?}");
    assert_eq!(letters[0]["RowKey"], ids[2].as_str(), "{letters:#?}");
    assert!(
        reason_of(&letters[0]).contains("attempt 3 of 3 failed and no attempts are left"),
        "{letters:#?}"
    );
    assert_eq!(env.queue_length(), 0, "the other messages were deleted");
}

fn max_attempts_above_delivery_limit(env: TestEnv) {
    env.register(
        "flaky",
        &guest("hostile"),
        &["--max-attempts", "8", "--backoff", "0.05"],
    );
    let _daemon = env.start_daemon(&["--concurrency", "1"]);

    // Retries are not crashes: all eight attempts run although the daemon dead-letters a
    // message after five deliveries that each stopped a worker.
    let id = env.submit("flaky", r#"{"mode": "retryable"}"#, &[]);
    let record = env.wait_one(&id, TASK_TIMEOUT);
    assert_ended_with(&record, "ERROR", "retryable error");
    assert!(
        !error_of(&record).contains("deliveries"),
        "retries count against the delivery limit for crashes: {record:#}"
    );
    assert_eq!(
        record["Attempt"], 8,
        "--max-attempts 8 is honoured: {record:#}"
    );
    assert_eq!(history_of(&record).len(), 8, "{record:#}");
    let letters = env.dead_letters_json();
    assert_eq!(letters.len(), 1, "{letters:#?}");
    assert!(
        reason_of(&letters[0]).contains("attempt 8 of 8 failed"),
        "dead-lettered after its last attempt, not for crashes: {letters:#?}"
    );
}

fn retry_defaults_and_backoff_cap(env: TestEnv) {
    let defaults = env.register("hostile", &guest("hostile"), &[]);
    assert_eq!(
        defaults["limits"]["retry"],
        json!({"max_attempts": 3, "backoff_ms": 1000, "max_backoff_ms": 60000}),
        "default retry policy: {defaults:#}"
    );

    // A 0.5 s backoff capped at 0.5 s: without the cap the fourth retry would wait 2 to
    // 4 s, with it every retry waits 0.25 to 0.5 s plus the time to lease the message.
    env.register(
        "capped",
        &guest("hostile"),
        &[
            "--max-attempts",
            "5",
            "--backoff",
            "0.5",
            "--max-backoff",
            "0.5",
        ],
    );
    let _daemon = env.start_daemon(&["--concurrency", "1"]);
    let id = env.submit("capped", r#"{"mode": "retryable"}"#, &[]);
    let record = env.wait_one(&id, TASK_TIMEOUT);
    assert_ended_with(&record, "ERROR", "retryable error");
    let history = history_of(&record);
    assert_eq!(history.len(), 5, "five attempts: {record:#}");
    for pair in history.windows(2) {
        let gap = seconds_between(time_of(&pair[0], "EndTime"), time_of(&pair[1], "StartTime"));
        let next = &pair[1]["Attempt"];
        assert!(
            gap >= 0.25,
            "attempt {next} waited {gap} s, less than 0.5 x 0.5 s"
        );
        assert!(
            gap < 1.5,
            "attempt {next} waited {gap} s although the cap is 0.5 s"
        );
    }
}

fn new_component_reaches_retrying_task(env: TestEnv) {
    // Both guests accept this payload: hostile reads the mode, multiply reads x and
    // ignores the other keys.
    let payload = r#"{"mode": "retryable", "x": 2}"#;
    let old = digest_of(&env.register(
        "fixable",
        &guest("hostile"),
        &["--max-attempts", "3", "--backoff", "4"],
    ));
    let _daemon = env.start_daemon(&["--concurrency", "1"]);
    let id = env.submit("fixable", payload, &[]);

    // The first attempt failed and the retry waits 2 to 4 s: register the fix meanwhile.
    let waiting = env.wait_for("the first attempt to fail", TASK_TIMEOUT, || {
        let record = env.status_json(&id);
        let retrying = record["Status"] == "CREATED" && record["Attempt"] == 1;
        retrying.then_some(record)
    });
    assert!(
        error_of(&waiting).contains("attempt 1 of 3 failed, retrying"),
        "the waiting record says it will retry: {waiting:#}"
    );
    let new = digest_of(&env.register("fixable", &guest("multiply"), &[]));
    assert_ne!(old, new, "the fix has another digest");

    let record = env.wait_one(&id, TASK_TIMEOUT);
    assert_eq!(status_of(&record), "COMPLETED", "record: {record:#}");
    assert_eq!(output_of(&record), json!({"product": 4}));
    assert_eq!(
        record["Attempt"], 2,
        "the fix ran the second attempt: {record:#}"
    );
    assert_eq!(
        record["ComponentDigest"],
        new.as_str(),
        "record: {record:#}"
    );
    let history = history_of(&record);
    assert_eq!(history.len(), 2, "two attempts: {record:#}");
    assert_eq!(
        history[0]["ComponentDigest"],
        old.as_str(),
        "attempt 1: {record:#}"
    );
    assert!(
        history[0]["ErrorMessage"]
            .as_str()
            .unwrap_or("")
            .contains("retryable error"),
        "attempt 1 names its error: {record:#}"
    );
    assert_eq!(
        history[1]["ComponentDigest"],
        new.as_str(),
        "attempt 2: {record:#}"
    );
    assert_eq!(
        history[1]["ErrorMessage"],
        Value::Null,
        "attempt 2: {record:#}"
    );
}

// Dead letters and bad input

fn poison_messages_dead_lettered_healthy_completes(env: TestEnv) {
    env.register(
        "always-trap",
        &guest("hostile"),
        &["--max-attempts", "3", "--backoff", "0.05"],
    );
    env.register("multiply", &guest("multiply"), &[]);

    let text = case_file("C08-poison-messages.jsonl");
    let lines: Vec<&str> = text
        .lines()
        .filter(|line| !line.trim().is_empty())
        .collect();
    assert_eq!(lines.len(), 6, "case messages");
    let [malformed, missing_row_key, no_record, unknown_type, trapping, extra_key] =
        lines[..].try_into().expect("checked above");
    let id_of = |line: &str| -> String {
        let message: Value = serde_json::from_str(line).expect("this case line is JSON");
        message["row_key"].as_str().expect("row_key").to_owned()
    };
    let unknown_id = id_of(unknown_type);
    let trapping_id = id_of(trapping);
    let extra_key_id = id_of(extra_key);
    let no_record_id = id_of(no_record);

    // Records for the messages that name a real task. The daemon runs a record's own
    // payload, so the trapping task's record carries the mode the guest needs.
    insert_record(&env, &unknown_id, "res-0008", "no_such_activity", "{}");
    // `x` is for the fix registered later.
    insert_record(
        &env,
        &trapping_id,
        "res-0008",
        "always-trap",
        r#"{"mode": "trap", "x": 3}"#,
    );
    insert_record(&env, &extra_key_id, "res-0008", "multiply", r#"{"x": 2}"#);
    enqueue_raw(&env, &lines);
    let healthy = env.submit("multiply", r#"{"x": 5}"#, &[]);

    let mut daemon = env.start_daemon(&["--concurrency", "1", "--missing-component-grace", "1"]);
    let task_ids = [
        unknown_id.clone(),
        trapping_id.clone(),
        extra_key_id.clone(),
        healthy.clone(),
    ];
    let records = env.wait_all(&task_ids, TASK_TIMEOUT);

    assert_eq!(
        status_of(&records[&healthy]),
        "COMPLETED",
        "{:#}",
        records[&healthy]
    );
    assert_eq!(output_of(&records[&healthy]), json!({"product": 10}));
    let extra = &records[&extra_key_id];
    assert_eq!(
        status_of(extra),
        "COMPLETED",
        "an extra key is ignored: {extra:#}"
    );
    assert_eq!(output_of(extra), json!({"product": 4}));
    let unknown = &records[&unknown_id];
    assert_ended_with(
        unknown,
        "ERROR",
        "no component registered for activity type \"no_such_activity\"",
    );
    assert_eq!(
        unknown["Attempt"], 1,
        "looking for a component is no attempt, only the final error is: {unknown:#}"
    );
    assert_eq!(history_of(unknown).len(), 1, "{unknown:#}");
    let trapped = &records[&trapping_id];
    assert_ended_with(trapped, "ERROR", "guest trapped");
    assert_eq!(
        trapped["Attempt"], 3,
        "--max-attempts 3 is honoured: {trapped:#}"
    );
    assert_eq!(history_of(trapped).len(), 3, "{trapped:#}");

    // The three messages that name no usable record are dead-lettered on first delivery,
    // the task without a component once its grace period is over, and the trapping task
    // after its last attempt.
    let letters = env.wait_for("five dead letters", TASK_TIMEOUT, || {
        let letters = env.dead_letters_json();
        (letters.len() == 5).then_some(letters)
    });
    for letter in &letters {
        let count = letter["DequeueCount"].as_u64().unwrap_or(0);
        assert!(
            (1..=3).contains(&count),
            "attempted at most 3 times: {letter:#}"
        );
    }
    let letter = dead_letter_with_body(&env, malformed).expect("malformed JSON is dead-lettered");
    assert!(
        reason_of(&letter).contains("invalid queue message"),
        "{letter:#}"
    );
    let letter =
        dead_letter_with_body(&env, missing_row_key).expect("missing row_key is dead-lettered");
    assert!(
        reason_of(&letter).contains("invalid queue message"),
        "{letter:#}"
    );
    assert!(
        reason_of(&letter).contains("row_key"),
        "names the missing key: {letter:#}"
    );
    let no_record_letter = dead_letter_with_body(&env, no_record)
        .expect("a message without a record is dead-lettered");
    assert!(
        reason_of(&no_record_letter).contains("no task record"),
        "{no_record_letter:#}"
    );
    assert!(
        reason_of(&no_record_letter).contains(&no_record_id),
        "names the task id: {no_record_letter:#}"
    );
    assert_eq!(
        no_record_letter["RowKey"],
        no_record_id.as_str(),
        "{no_record_letter:#}"
    );
    assert_eq!(env.queue_length(), 0, "queue");
    let trapping_letter = letters
        .iter()
        .find(|letter| letter["RowKey"] == trapping_id.as_str())
        .expect("the trapping task is dead-lettered");
    assert!(
        reason_of(trapping_letter).contains("attempt 3 of 3 failed and no attempts are left"),
        "{trapping_letter:#}"
    );
    assert!(
        reason_of(trapping_letter).contains("guest trapped"),
        "the reason carries the last error: {trapping_letter:#}"
    );
    assert_eq!(trapping_letter["DequeueCount"], 3, "{trapping_letter:#}");

    // Requeued once a fixed component is registered, the trapping task runs again.
    env.register("always-trap", &guest("multiply"), &[]);
    // Longer than the daemon's 50 ms registry poll, with room for a loaded machine.
    std::thread::sleep(Duration::from_secs(1));
    env.run_ok(&[
        "requeue",
        trapping_letter["Id"]
            .as_str()
            .expect("dead letter ids are strings"),
    ]);
    let record = env.wait_one(&trapping_id, TASK_TIMEOUT);
    assert_eq!(status_of(&record), "COMPLETED", "{record:#}");
    assert_eq!(output_of(&record), json!({"product": 6}));
    assert_eq!(record["Attempt"], 4, "attempt numbers go on: {record:#}");
    assert_eq!(
        history_of(&record).len(),
        4,
        "the history is kept: {record:#}"
    );

    // Requeued after its record exists, the message runs.
    insert_record(&env, &no_record_id, "res-0008", "multiply", r#"{"x": 1}"#);
    env.run_ok(&[
        "requeue",
        no_record_letter["Id"]
            .as_str()
            .expect("dead letter ids are strings"),
    ]);
    let record = env.wait_one(&no_record_id, TASK_TIMEOUT);
    assert_eq!(status_of(&record), "COMPLETED", "{record:#}");
    assert_eq!(output_of(&record), json!({"product": 2}));

    // Requeued as it is, a malformed message is dead-lettered again under a new id.
    let first = dead_letter_with_body(&env, malformed).expect("still dead-lettered");
    env.run_ok(&[
        "requeue",
        first["Id"].as_str().expect("dead letter ids are strings"),
    ]);
    let again = env.wait_for(
        "the requeued malformed message to be dead-lettered again",
        TASK_TIMEOUT,
        || dead_letter_with_body(&env, malformed).filter(|letter| letter["Id"] != first["Id"]),
    );
    assert!(
        reason_of(&again).contains("invalid queue message"),
        "{again:#}"
    );
    assert_eq!(
        env.dead_letters_json().len(),
        3,
        "missing row_key, malformed and the task without a component remain"
    );
    // Dead letter ids are numbers on SQLite and time-ordered names on Azure.
    let unknown_id = match env.is_azure() {
        true => "9223370271066953806-0a1b2c3d",
        false => "999999",
    };
    let unknown = env.run(&["requeue", unknown_id]);
    assert_eq!(
        unknown.code(),
        1,
        "requeue of an unknown id fails: {}",
        unknown.stderr
    );
    assert!(unknown.stderr.contains("not found"), "{}", unknown.stderr);
    for malformed in ["abc", "-1"] {
        let malformed_id = env.run(&["requeue", "--", malformed]);
        assert_eq!(
            malformed_id.code(),
            2,
            "requeue of the malformed id {malformed} is bad usage: {}",
            malformed_id.stderr
        );
        let expected = format!("invalid dead letter id \"{malformed}\"");
        assert!(
            malformed_id.stderr.contains(&expected),
            "{}",
            malformed_id.stderr
        );
    }

    assert!(
        daemon.is_alive(),
        "the daemon survived every message{}",
        daemon.log_tail()
    );
    assert!(
        !daemon.log().contains("panicked"),
        "no panic{}",
        daemon.log_tail()
    );
}

/// A requeued task whose attempts were used up runs once more, and the dead letter of
/// that attempt calls it an extra one beyond the retry policy.
fn requeued_task_gets_one_extra_attempt(env: TestEnv) {
    env.register("always-trap", &guest("hostile"), &["--max-attempts", "1"]);
    let _daemon = env.start_daemon(&["--concurrency", "1"]);
    let task_id = env.submit("always-trap", r#"{"mode": "trap"}"#, &[]);
    let letter_of_task = || {
        env.dead_letters_json()
            .into_iter()
            .find(|letter| letter["RowKey"] == task_id.as_str())
    };

    let first = env.wait_for("the task's dead letter", TASK_TIMEOUT, letter_of_task);
    assert!(
        reason_of(&first).starts_with("attempt 1 of 1 failed and no attempts are left"),
        "{first:#}"
    );
    env.run_ok(&[
        "requeue",
        first["Id"].as_str().expect("dead letter ids are strings"),
    ]);

    let second = env.wait_for("the dead letter of the extra attempt", TASK_TIMEOUT, || {
        letter_of_task().filter(|letter| letter["Id"] != first["Id"])
    });
    assert!(
        reason_of(&second).starts_with(
            "attempt 2 (an extra one beyond the retry policy's 1 attempt) failed and no \
             attempts are left: guest trapped"
        ),
        "{second:#}"
    );
    let record = env.status_json(&task_id);
    assert_eq!(status_of(&record), "ERROR", "{record:#}");
    assert_eq!(record["Attempt"], 2, "{record:#}");
    assert_eq!(history_of(&record).len(), 2, "{record:#}");
}

fn base64_body_dead_lettered_raw_completes(env: TestEnv) {
    env.register("multiply", &guest("multiply"), &[]);
    env.register("hostile", &guest("hostile"), &[]);

    // The raw message needs its record, written with the message in one submit.
    let raw = case_file("C03-message-raw.json");
    let raw = raw.trim_end();
    let message: Value = serde_json::from_str(raw).expect("the raw case message is JSON");
    let task_id = message["row_key"].as_str().expect("row_key");
    let resource_id = message["resource_id"].as_str().expect("resource_id");
    let record = TaskRecord::new(
        task_id,
        resource_id,
        "multiply",
        &message["payload"].to_string(),
    );
    let backend = env.backend();
    runtime()
        .block_on(backend.submit(
            &record,
            &OutgoingMessage {
                body: raw.to_owned(),
                delay: Duration::ZERO,
            },
        ))
        .expect("failed to submit the raw case message");
    // Two slots, so that a copy of a running task's message is leased while it runs.
    let _daemon = env.start_daemon(&["--concurrency", "2"]);
    let record = env.wait_one(task_id, TASK_TIMEOUT);
    assert_eq!(
        status_of(&record),
        "COMPLETED",
        "the raw message runs: {record:#}"
    );
    assert_eq!(output_of(&record), json!({"product": 42}));
    assert_eq!(record["Attempt"], 1, "{record:#}");

    // The base64 copy of the same message arrives after the task finished.
    let encoded = case_file("C03-message-base64.txt");
    let encoded = encoded.trim_end();
    enqueue_raw(&env, &[encoded]);

    let letter = env.wait_for(
        "the base64 message to be dead-lettered",
        TASK_TIMEOUT,
        || dead_letter_with_body(&env, encoded),
    );
    assert_eq!(
        letter["DequeueCount"], 1,
        "dead-lettered at once: {letter:#}"
    );
    assert_eq!(letter["RowKey"], task_id, "{letter:#}");
    assert!(
        reason_of(&letter).contains("invalid queue message"),
        "{letter:#}"
    );
    assert!(
        reason_of(&letter).contains("JSON"),
        "the reason says the body is not valid JSON: {letter:#}"
    );
    assert!(
        reason_of(&letter).contains("not base64"),
        "the reason names the expected encoding: {letter:#}"
    );
    let after = env.status_json(task_id);
    assert_eq!(
        status_of(&after),
        "COMPLETED",
        "the base64 copy changed nothing: {after:#}"
    );

    // A base64 copy that arrives while the task runs is only dead-lettered: the attempt
    // holds the lease and stores the outcome, and the task is never in both tables.
    let running_id = env.submit(
        "hostile",
        r#"{"mode": "sleep", "ms": 5000}"#,
        &["--resource", resource_id],
    );
    env.wait_for_status(&running_id, "RUNNING", TASK_TIMEOUT);
    let mut copy = message.clone();
    copy["row_key"] = json!(running_id);
    copy["task_type"] = json!("hostile");
    let copy_encoded = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(copy.to_string())
    };
    enqueue_raw(&env, &[&copy_encoded]);
    env.wait_for(
        "the copy of the running task's message to be dead-lettered",
        TASK_TIMEOUT,
        || dead_letter_with_body(&env, &copy_encoded),
    );
    let during = env.status_json(&running_id);
    assert_eq!(
        status_of(&during),
        "RUNNING",
        "the copy left the running task alone: {during:#}"
    );
    assert!(
        !env.row_keys(TaskTable::Finished).contains(&running_id),
        "the running task is not in the finished table too"
    );
    let done = env.wait_one(&running_id, TASK_TIMEOUT);
    assert_eq!(status_of(&done), "COMPLETED", "{done:#}");
    assert_eq!(done["Attempt"], 1, "{done:#}");
    assert_eq!(history_of(&done).len(), 1, "one attempt ran: {done:#}");
    let finished_rows = env.row_keys(TaskTable::Finished);
    assert_eq!(
        finished_rows.iter().filter(|id| **id == running_id).count(),
        1,
        "one finished row"
    );
    assert!(
        !env.row_keys(TaskTable::Active).contains(&running_id),
        "no active row left"
    );

    // A task whose only message is base64 ends ERROR instead of staying CREATED.
    let other_id = "00000000-0000-4000-8000-000000000002";
    insert_record(&env, other_id, resource_id, "multiply", r#"{"x": 5}"#);
    let mut other = message.clone();
    other["row_key"] = json!(other_id);
    let other_encoded = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(other.to_string())
    };
    enqueue_raw(&env, &[&other_encoded]);
    let failed = env.wait_one(other_id, TASK_TIMEOUT);
    assert_eq!(status_of(&failed), "ERROR", "{failed:#}");
    assert_eq!(
        failed["Attempt"], 0,
        "the base64 delivery is not an attempt: {failed:#}"
    );
    assert!(
        error_of(&failed).contains("base64"),
        "the error names the encoding: {failed:#}"
    );
    assert!(
        error_of(&failed).contains("submit the task again with `bgw submit`"),
        "the error names a command that helps: {failed:#}"
    );
    let other_letter = env.wait_for(
        "the second base64 message to be dead-lettered",
        TASK_TIMEOUT,
        || dead_letter_with_body(&env, &other_encoded),
    );
    assert_eq!(other_letter["DequeueCount"], 1, "{other_letter:#}");
    assert_eq!(
        other_letter["RowKey"], other_id,
        "the dead letter names the decoded task: {other_letter:#}"
    );
    assert_eq!(other_letter["ResourceId"], resource_id, "{other_letter:#}");
}

// Cancellation

/// Cancels a task leased ahead while it waits for the only worker slot. Its attempt began,
/// and its record shows RUNNING, before it had the slot, and it must end CANCELLED when it
/// gets the slot, without running its guest.
fn cancel_while_waiting_for_slot_never_runs(env: TestEnv) {
    env.register("hostile", &guest("hostile"), &[]);
    let _daemon = env.start_daemon(&["--concurrency", "1"]);
    // The daemon leases ahead only once it has stored an outcome and measured a run.
    let warm_up = env.submit("hostile", r#"{"mode": "echo"}"#, &[]);
    env.wait_for_status(&warm_up, "COMPLETED", TASK_TIMEOUT);

    let blocker = env.submit("hostile", r#"{"mode": "sleep", "ms": 4000}"#, &[]);
    env.wait_for_status(&blocker, "RUNNING", TASK_TIMEOUT);
    let waiting = env.submit("hostile", r#"{"mode": "sleep", "ms": 10000}"#, &[]);
    env.wait_for_status(&waiting, "RUNNING", TASK_TIMEOUT);
    let blocker_record = env.status_json(&blocker);
    assert_eq!(
        blocker_record["Status"], "RUNNING",
        "the second task was leased ahead while the first one held the only slot: \
         {blocker_record:#}"
    );
    let printed = env.run_ok(&["cancel", &waiting]);
    assert!(
        printed.contains("cancellation requested"),
        "cancel output: {printed}"
    );

    let records = env.wait_all(&[blocker.clone(), waiting.clone()], TASK_TIMEOUT);
    let record = &records[&waiting];
    assert_ended_with(record, "CANCELLED", "cancelled before it started");
    assert_eq!(
        record["FuelUsed"],
        Value::Null,
        "its guest never ran: {record:#}"
    );
    assert_eq!(
        record["StartTime"],
        Value::Null,
        "it never started: {record:#}"
    );
    let slot_freed = time_of(&records[&blocker], "EndTime");
    let after_slot = seconds_between(slot_freed, time_of(record, "EndTime"));
    assert!(
        after_slot < 1.0,
        "it ended {after_slot} s after the slot was free, not after a cancellation grace \
         period: {record:#}"
    );
}

fn cancel_queued_running_finished_and_unknown(env: TestEnv) {
    env.register("hostile", &guest("hostile"), &[]);
    env.register("multiply", &guest("multiply"), &[]);
    let daemon = env.start_daemon(&["--concurrency", "2"]);

    // A queued task is CANCELLED at once.
    let queued = env.submit("multiply", r#"{"x": 1}"#, &["--delay", "30"]);
    let printed = env.run_ok(&["cancel", &queued]);
    assert!(
        printed.contains("will not start"),
        "cancel output: {printed}"
    );
    let record = env.status_json(&queued);
    assert_ended_with(&record, "CANCELLED", "cancelled before it started");
    assert_eq!(
        record["StartTime"],
        Value::Null,
        "it never started: {record:#}"
    );

    // Its message is acknowledged when it becomes visible, and the task never runs. The
    // message of the first task stays in the queue for its 30 s delay.
    let soon = env.submit("multiply", r#"{"x": 1}"#, &["--delay", "2"]);
    env.run_ok(&["cancel", &soon]);
    assert_eq!(
        env.queue_length(),
        2,
        "both cancelled tasks' messages wait in the queue"
    );
    env.wait_for(
        "the cancelled task's message to be acknowledged",
        TASK_TIMEOUT,
        || (env.queue_length() == 1).then_some(()),
    );
    let record = env.status_json(&soon);
    assert_ended_with(&record, "CANCELLED", "cancelled before it started");
    assert_eq!(record["Attempt"], 0, "no attempt ran: {record:#}");
    assert_eq!(record["HostId"], Value::Null, "no host ran it: {record:#}");
    assert!(
        daemon
            .log()
            .lines()
            .any(|line| line.contains(&soon) && line.contains("acknowledging duplicate delivery")),
        "the daemon acknowledged the message without running it{}",
        daemon.log_tail()
    );

    // A running task is interrupted after the cancellation grace period.
    let running = env.submit("hostile", r#"{"mode": "sleep", "ms": 60000}"#, &[]);
    env.wait_for_status(&running, "RUNNING", TASK_TIMEOUT);
    let requested_at = Instant::now();
    let printed = env.run_ok(&["cancel", &running]);
    assert!(
        printed.contains("cancellation requested"),
        "cancel output: {printed}"
    );
    let limit = CANCEL_GRACE + Duration::from_secs(2);
    let record = env.wait_one(&running, limit);
    let took = requested_at.elapsed();
    assert_ended_with(&record, "CANCELLED", "cancelled while running");
    assert!(took <= limit, "cancelled after {took:?}, limit {limit:?}");
    assert_eq!(
        record["Attempt"], 1,
        "a cancelled task is not retried: {record:#}"
    );

    // A finished task and an unknown id cannot be cancelled.
    let done = env.submit("multiply", r#"{"x": 21}"#, &[]);
    env.wait_for_status(&done, "COMPLETED", TASK_TIMEOUT);
    let result = env.run(&["cancel", &done]);
    assert_eq!(
        result.code(),
        1,
        "cancel of a finished task: {}",
        result.stderr
    );
    assert!(
        result.stderr.contains("already finished"),
        "{}",
        result.stderr
    );
    assert!(result.stderr.contains("COMPLETED"), "{}", result.stderr);
    let result = env.run(&["cancel", "00000000-0000-4000-8000-00000000beef"]);
    assert_eq!(
        result.code(),
        1,
        "cancel of an unknown id: {}",
        result.stderr
    );
    assert!(result.stderr.contains("not found"), "{}", result.stderr);
}

/// Reads one task's record with the Python library's `SqliteTaskStore` and the result
/// with its `WorkflowClient.get_result`, and prints both as JSON.
const PYTHON_READER: &str = r#"
import json, sys
from background_workflows.storage.tables.sqlite_task_store import SqliteTaskStore
from background_workflows.utils.workflow_client import WorkflowClient

db_path, resource_id, row_key = sys.argv[1:4]
store = SqliteTaskStore(db_path, "ActiveTasks", "FinishedTasks")
store.create_if_not_exists()
entity = store.get_task(resource_id, row_key)
client = WorkflowClient(store, None, None)
print(json.dumps({
    "found": entity is not None,
    "status": entity.Status if entity else None,
    "error": entity.ErrorMessage if entity else None,
    "result": client.get_result(row_key, resource_id),
}))
store.close()
"#;

fn read_with_python(env: &TestEnv, resource_id: &str, task_id: &str) -> Value {
    let output = Command::new(support::python_with_library())
        .arg("-c")
        .arg(PYTHON_READER)
        .arg(env.db_path())
        .args([resource_id, task_id])
        .current_dir(env.data_dir())
        .output()
        .expect("failed to start the Python reader");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the Python reader failed:\n{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|error| {
        panic!("the Python reader printed invalid JSON ({error}): {stdout}")
    })
}

// SQLite only: the Python library's SqliteTaskStore reads the database file; its Azure
// interop is checked by tests/python_interop.rs.
#[test]
fn python_library_reads_cancelled_and_completed() {
    let env = TestEnv::new();
    env.register("multiply", &guest("multiply"), &[]);
    let cancelled = env.submit("multiply", r#"{"x": 1}"#, &["--delay", "30"]);
    env.run_ok(&["cancel", &cancelled]);
    let _daemon = env.start_daemon(&["--concurrency", "1"]);
    let completed = env.submit("multiply", r#"{"x": 21}"#, &[]);
    env.wait_for_status(&completed, "COMPLETED", TASK_TIMEOUT);

    let read = read_with_python(&env, support::DEFAULT_RESOURCE, &cancelled);
    assert_eq!(
        read["found"], true,
        "Python finds the cancelled task: {read}"
    );
    assert_eq!(read["status"], "CANCELLED", "{read}");
    assert_eq!(read["error"], "cancelled before it started", "{read}");
    assert_eq!(
        read["result"],
        Value::Null,
        "a cancelled task has no result: {read}"
    );

    let read = read_with_python(&env, support::DEFAULT_RESOURCE, &completed);
    assert_eq!(read["status"], "COMPLETED", "{read}");
    assert_eq!(read["result"], json!({"product": 42}), "get_result: {read}");
}

// Delays, deadlines and idempotency keys

fn delayed_task_waits_and_past_time_starts_now(env: TestEnv) {
    env.register("multiply", &guest("multiply"), &[]);
    let _daemon = env.start_daemon(&["--concurrency", "2"]);

    let delayed = env.submit("multiply", r#"{"x": 1}"#, &["--delay", "2"]);
    let past = env.submit("multiply", r#"{"x": 2}"#, &["--at", "2020-01-01T00:00:00Z"]);
    let records = env.wait_all(&[delayed.clone(), past.clone()], TASK_TIMEOUT);

    let record = &records[&delayed];
    assert_eq!(status_of(record), "COMPLETED", "{record:#}");
    let waited = seconds_between(time_of(record, "CreatedTime"), time_of(record, "StartTime"));
    assert!(
        waited >= 2.0,
        "--delay 2 started after {waited} s: {record:#}"
    );

    let record = &records[&past];
    assert_eq!(status_of(record), "COMPLETED", "{record:#}");
    let waited = seconds_between(time_of(record, "CreatedTime"), time_of(record, "StartTime"));
    assert!(
        waited < 2.0,
        "--at in the past started after {waited} s: {record:#}"
    );
}

fn idempotency_key_creates_one_task(env: TestEnv) {
    env.register("multiply", &guest("multiply"), &[]);

    // Two processes submit each key at the same moment.
    let keys = ["order-1", "order-2", "order-3"];
    let mut children = Vec::new();
    for key in keys {
        for _ in 0..2 {
            let child = env
                .command(&[
                    "submit",
                    "multiply",
                    "--resource",
                    support::DEFAULT_RESOURCE,
                    "--payload",
                    r#"{"x": 3}"#,
                    "--idempotency-key",
                    key,
                ])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("failed to start `bgw submit`");
            children.push((key, child));
        }
    }
    let mut ids_per_key: std::collections::HashMap<&str, Vec<String>> = Default::default();
    for (key, child) in children {
        let output = child
            .wait_with_output()
            .expect("failed to wait for `bgw submit`");
        assert!(
            output.status.success(),
            "submit with key {key} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let id = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        ids_per_key.entry(key).or_default().push(id);
    }
    for key in keys {
        let ids = &ids_per_key[key];
        assert_eq!(
            ids[0], ids[1],
            "both submits with key {key} return one task id"
        );
        let again = env.submit("multiply", r#"{"x": 3}"#, &["--idempotency-key", key]);
        assert_eq!(
            again, ids[0],
            "a later submit with key {key} returns the same id"
        );
    }

    let records = env.list_json();
    assert_eq!(
        records.len(),
        keys.len(),
        "one record per key: {records:#?}"
    );
    for key in keys {
        let count = records
            .iter()
            .filter(|record| record["IdempotencyKey"] == key)
            .count();
        assert_eq!(count, 1, "one record with key {key}");
    }
    assert_eq!(
        env.row_keys(TaskTable::Active).len(),
        keys.len(),
        "one row in the active table per key"
    );
    assert_eq!(env.queue_length(), keys.len() as u64, "one message per key");

    // The key with another payload or resource is an error that names the key and the task.
    let first_id = &ids_per_key[keys[0]][0];
    let changed: [&[&str]; 2] = [
        &["--payload", r#"{"x": 4}"#],
        &["--payload", r#"{"x": 3}"#, "--resource", "res-other"],
    ];
    for extra in changed {
        let mut args = vec!["submit", "multiply", "--idempotency-key", keys[0]];
        if !extra.contains(&"--resource") {
            args.extend(["--resource", support::DEFAULT_RESOURCE]);
        }
        args.extend_from_slice(extra);
        let result = env.run(&args);
        assert_eq!(result.code(), 2, "{extra:?}: {result:?}");
        assert_eq!(result.stdout, "", "{extra:?}: no task id is printed");
        let expected = format!(
            "idempotency key \"{}\" was already used by task {first_id} with a different",
            keys[0]
        );
        assert!(
            result.stderr.contains(&expected),
            "{extra:?}: {}",
            result.stderr
        );
    }
    assert_eq!(env.list_json().len(), keys.len(), "no task was added");

    // Keys belong to one deployment: another one in the same account reuses them freely.
    let other = env.another_deployment();
    other.register("multiply", &guest("multiply"), &[]);
    let id = other.submit("multiply", r#"{"x": 3}"#, &["--idempotency-key", keys[0]]);
    assert_ne!(
        id, ids_per_key[keys[0]][0],
        "another deployment gets its own task for key {}",
        keys[0]
    );
    assert_eq!(
        other.status_json(&id)["Status"],
        "CREATED",
        "the other deployment stored its task"
    );
}

fn deadlines_end_tasks_with_reason(env: TestEnv) {
    env.register(
        "hostile",
        &guest("hostile"),
        &["--max-attempts", "3", "--backoff", "0.05"],
    );
    env.register(
        "slow-retry",
        &guest("hostile"),
        &["--max-attempts", "5", "--backoff", "4"],
    );
    // Its deadline passes before any daemon runs. A deadline that short is accepted: only
    // one that comes before a delay ends is rejected.
    let late = env.submit("hostile", r#"{"mode": "echo"}"#, &["--deadline", "0.001"]);
    std::thread::sleep(Duration::from_millis(100));
    let _daemon = env.start_daemon(&["--concurrency", "3"]);

    let running = env.submit(
        "hostile",
        r#"{"mode": "sleep", "ms": 20000}"#,
        &["--deadline", "1"],
    );
    let spinning = env.submit("hostile", r#"{"mode": "spin"}"#, &["--deadline", "1.5"]);
    // Its first retry would come 2 to 4 s after the first attempt, after its deadline.
    let retrying = env.submit(
        "slow-retry",
        r#"{"mode": "retryable"}"#,
        &["--deadline", "1.5"],
    );
    let records = env.wait_all(
        &[
            running.clone(),
            late.clone(),
            spinning.clone(),
            retrying.clone(),
        ],
        TASK_TIMEOUT,
    );

    let record = &records[&running];
    assert_ended_with(record, "ERROR", "task deadline");
    assert!(
        error_of(record).contains("reached while the attempt ran"),
        "{record:#}"
    );
    assert_eq!(
        record["Attempt"], 1,
        "a passed deadline is not retried: {record:#}"
    );
    let ran = seconds_between(time_of(record, "StartTime"), time_of(record, "EndTime"));
    assert!(
        ran < 3.0,
        "the attempt was stopped after {ran} s: {record:#}"
    );

    let record = &records[&late];
    assert_ended_with(record, "ERROR", "passed before the task could start");
    assert_eq!(
        record["StartTime"],
        Value::Null,
        "it never started: {record:#}"
    );

    // A fractional deadline stops a busy guest within a few epoch ticks of it, where a
    // limit rounded up to whole seconds would let it run up to 1 s longer.
    let record = &records[&spinning];
    assert_ended_with(record, "ERROR", "reached while the attempt ran");
    let late_by = seconds_between(time_of(record, "DeadlineTime"), time_of(record, "EndTime"));
    assert!(
        late_by < 0.3,
        "the attempt ended {late_by} s after the deadline: {record:#}"
    );
    assert!(
        late_by > -0.1,
        "the attempt ended {} s before the deadline: {record:#}",
        -late_by
    );

    // No retry is scheduled past the deadline: the task ends at once with its attempt's
    // error, and its message is not dead-lettered.
    let record = &records[&retrying];
    assert_ended_with(record, "ERROR", "would start after the task deadline");
    assert!(
        error_of(record).contains("hostile guest returned retryable on purpose"),
        "the attempt's own error is kept: {record:#}"
    );
    assert_eq!(record["Attempt"], 1, "one attempt ran: {record:#}");
    let early_by = seconds_between(time_of(record, "EndTime"), time_of(record, "DeadlineTime"));
    assert!(
        early_by > 0.0,
        "the task ended {} s after its deadline, not when its attempt failed: {record:#}",
        -early_by
    );
    assert!(
        env.dead_letters_json()
            .iter()
            .all(|letter| letter["RowKey"] != json!(retrying)),
        "a task past its deadline is not dead-lettered"
    );
}

/// Tasks leased ahead wait for the only worker slot while their deadlines pass. Their
/// attempts began before they had the slot. Each must end at its deadline without running
/// its guest, not run once the slot is free: ERROR, or CANCELLED when a cancellation was
/// requested during the wait.
fn deadline_passes_while_waiting_for_slot(env: TestEnv) {
    env.register("hostile", &guest("hostile"), &[]);
    let _daemon = env.start_daemon(&["--concurrency", "1"]);
    // The daemon leases ahead only once it has measured runs, and no more tasks than it
    // stored outcomes for recently.
    let warm_up = env.submit_many("hostile", r#"{"mode": "echo"}"#, &["--count", "4"]);
    env.wait_all(&warm_up, TASK_TIMEOUT);

    let blocker = env.submit("hostile", r#"{"mode": "sleep", "ms": 5000}"#, &[]);
    env.wait_for_status(&blocker, "RUNNING", TASK_TIMEOUT);
    let waiting = env.submit("hostile", r#"{"mode": "echo"}"#, &["--deadline", "1.5"]);
    let cancelled = env.submit("hostile", r#"{"mode": "echo"}"#, &["--deadline", "2.5"]);
    env.wait_for_status(&waiting, "RUNNING", TASK_TIMEOUT);
    env.wait_for_status(&cancelled, "RUNNING", TASK_TIMEOUT);
    env.run_ok(&["cancel", &cancelled]);
    let record = env.wait_for_status(&waiting, "ERROR", TASK_TIMEOUT);

    assert_ended_with(
        &record,
        "ERROR",
        "passed while the task waited for a worker slot",
    );
    assert_eq!(record["StartTime"], Value::Null, "it never ran: {record:#}");
    assert_eq!(record["FuelUsed"], Value::Null, "it never ran: {record:#}");
    let late_by = seconds_between(
        time_of(&record, "DeadlineTime"),
        time_of(&record, "EndTime"),
    );
    assert!(
        late_by < 1.0,
        "it ended {late_by} s after its deadline, not at it: {record:#}"
    );
    let record = env.wait_for_status(&cancelled, "CANCELLED", TASK_TIMEOUT);
    assert_ended_with(&record, "CANCELLED", "cancelled before it started");
    assert_eq!(record["StartTime"], Value::Null, "it never ran: {record:#}");
    assert_eq!(
        record["CancelRequested"],
        json!(true),
        "the request stays recorded: {record:#}"
    );
    assert_eq!(
        status_of(&env.status_json(&blocker)),
        "RUNNING",
        "both tasks ended while the slot was still busy"
    );
}

// Delivery: busy workers, busy cores and duplicate messages

/// Fifteen tasks submitted while two long tasks take both worker slots. A daemon with no
/// free slot leases nothing, so the queued messages stay in the queue until a slot frees.
/// The 1 s visibility timeout is shorter than that wait, so a queued task whose lease
/// expired while it waited for a slot would run a second attempt.
fn queued_tasks_outlast_busy_workers(env: TestEnv) {
    const QUEUED: u64 = 15;
    env.register("hostile", &guest("hostile"), &[]);
    let _daemon = env.start_daemon(&["--concurrency", "2", "--visibility-timeout", "1"]);
    let blocker_payload = json!({"mode": "sleep", "ms": 2_000}).to_string();
    let blockers = env.submit_many("hostile", &blocker_payload, &["--count", "2"]);
    for id in &blockers {
        env.wait_for_status(id, "RUNNING", TASK_TIMEOUT);
    }

    // Each queued task sleeps its own number of milliseconds, which its result repeats.
    let sleeps: Vec<u64> = (0..QUEUED).map(|index| 100 + index).collect();
    let lines: Vec<String> = sleeps
        .iter()
        .map(|ms| json!({"mode": "sleep", "ms": ms}).to_string())
        .collect();
    let payloads = env.data_dir().join("queued.jsonl");
    std::fs::write(&payloads, lines.join("\n")).expect("failed to write the payload file");
    let queued = env.submit_many("hostile", "{}", &["--payloads", path_str(&payloads)]);
    assert_eq!(queued.len(), sleeps.len(), "one task id per payload line");

    let mut all = blockers.clone();
    all.extend(queued.iter().cloned());
    let records = env.wait_all(&all, TASK_TIMEOUT);
    let first_slot_free = blockers
        .iter()
        .map(|id| time_of(&records[id], "EndTime"))
        .min()
        .expect("the test submitted two blockers");
    for id in &blockers {
        let record = &records[id];
        assert_eq!(status_of(record), "COMPLETED", "blocker {id}: {record:#}");
        assert_eq!(record["Attempt"], 1, "blocker {id}: {record:#}");
    }
    for (id, ms) in queued.iter().zip(&sleeps) {
        let record = &records[id];
        assert_eq!(
            status_of(record),
            "COMPLETED",
            "queued task {id}: {record:#}"
        );
        assert_eq!(
            output_of(record),
            json!({"slept_ms": ms}),
            "queued task {id} has its own result"
        );
        assert_eq!(
            record["Attempt"], 1,
            "queued task {id} ran once: {record:#}"
        );
        assert_eq!(history_of(record).len(), 1, "queued task {id}: {record:#}");
        assert!(
            time_of(record, "CreatedTime") < first_slot_free,
            "queued task {id} was submitted while both slots were busy: {record:#}"
        );
        assert!(
            time_of(record, "StartTime") >= first_slot_free,
            "queued task {id} started only once a slot was free, at {first_slot_free}: \
             {record:#}"
        );
    }
    assert_eq!(env.queue_length(), 0, "queue");
    assert_eq!(env.dead_letters_json().len(), 0, "dead letters");
}

/// Tasks the busy-cores test submits, and the time they must all complete in. A daemon
/// that paused a second per message for a CPU check would need 40 s.
const LOADED_TASKS: usize = 40;
const LOADED_INTAKE_LIMIT: Duration = Duration::from_secs(20);

/// Forty tasks submitted while one busy-loop process per core keeps every core at 100 %.
/// The loops run at the lowest priority, so they take little more than the time that other
/// processes leave idle, and tests running beside this one keep nearly all of the CPU. A
/// CPU-usage or load-average check still finds every core busy, so a daemon that waited
/// for an idle core would never lease.
fn busy_cores_never_stop_intake(env: TestEnv) {
    env.register("multiply", &guest("multiply"), &[]);
    let mut daemon = env.start_daemon(&["--concurrency", "2"]);
    let mut load = CpuLoad::on_every_core();
    // At the lowest priority, the loops can wait a while for their first tick when tests
    // running beside this one keep the cores busy.
    env.wait_for(
        "the busy loops to use CPU time",
        Duration::from_secs(30),
        || (load.cpu_ticks() > 0).then_some(()),
    );

    let started = Instant::now();
    let lines: Vec<String> = (0..LOADED_TASKS)
        .map(|x| json!({ "x": x }).to_string())
        .collect();
    let payloads = env.data_dir().join("loaded.jsonl");
    std::fs::write(&payloads, lines.join("\n")).expect("failed to write the payload file");
    let ids = env.submit_many("multiply", "{}", &["--payloads", path_str(&payloads)]);
    assert_eq!(ids.len(), LOADED_TASKS, "one task id per payload line");
    let records = env.wait_all(&ids, LOADED_INTAKE_LIMIT);
    let took = started.elapsed();

    assert!(
        took <= LOADED_INTAKE_LIMIT,
        "{LOADED_TASKS} tasks took {took:?} under load, limit {LOADED_INTAKE_LIMIT:?}"
    );
    for (x, id) in ids.iter().enumerate() {
        let record = &records[id];
        assert_eq!(status_of(record), "COMPLETED", "task {id}: {record:#}");
        assert_eq!(
            output_of(record),
            json!({"product": 2 * x}),
            "task {id} has its own result"
        );
    }
    assert!(
        load.still_runs(),
        "every busy loop ran until the tasks completed"
    );
    assert!(
        daemon.is_alive(),
        "the daemon still runs{}",
        daemon.log_tail()
    );
}

/// One busy-loop process per core, at the lowest priority. Dropping it kills each process
/// by its pid and reaps it.
struct CpuLoad {
    loops: Vec<std::process::Child>,
}

impl CpuLoad {
    fn on_every_core() -> CpuLoad {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let loops = (0..cores)
            .map(|_| {
                let mut command = Command::new("sh");
                command.args(["-c", "while :; do :; done"]);
                support::kill_with_parent(&mut command);
                lowest_priority(&mut command);
                command.spawn().expect("failed to start a busy loop")
            })
            .collect();
        CpuLoad { loops }
    }

    /// Returns true while every busy loop runs.
    fn still_runs(&mut self) -> bool {
        self.loops.iter_mut().all(|child| {
            child
                .try_wait()
                .expect("failed to check a busy loop")
                .is_none()
        })
    }

    /// Returns the CPU time the busy loops used, in clock ticks, from `/proc/PID/stat`.
    fn cpu_ticks(&self) -> u64 {
        self.loops
            .iter()
            .map(|child| {
                let path = format!("/proc/{}/stat", child.id());
                let stat = std::fs::read_to_string(&path)
                    .unwrap_or_else(|error| panic!("failed to read {path}: {error}"));
                // utime and stime are fields 14 and 15. The command name before them is in
                // parentheses and may contain spaces, so fields are counted after the last ')'.
                let name_end = stat
                    .rfind(')')
                    .expect("the stat line names the command in parentheses");
                let fields: Vec<&str> = stat[name_end + 1..].split_whitespace().collect();
                let ticks = |index: usize| fields[index].parse::<u64>().unwrap_or(0);
                ticks(11) + ticks(12)
            })
            .sum()
    }
}

impl Drop for CpuLoad {
    fn drop(&mut self) {
        for child in &mut self.loops {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Makes a child process start at nice 19, the lowest CPU priority.
fn lowest_priority(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the child between fork and exec and calls only
    // setpriority, which is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            if libc::setpriority(libc::PRIO_PROCESS, 0, 19) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Enqueues a copy of a completed task's message after the task finished, as a second put
/// by a producer or a redelivery by a broker would. The daemon must acknowledge it and
/// leave the stored outcome as it is.
fn duplicate_delivery_keeps_completed_record(env: TestEnv) {
    env.register("multiply", &guest("multiply"), &[]);
    let task_id = env.submit("multiply", r#"{"x": 21}"#, &[]);

    // The message exactly as the submit enqueued it, copied before any daemon runs.
    let backend = env.backend();
    let lease = runtime()
        .block_on(backend.lease(1, Duration::from_secs(30)))
        .expect("failed to lease the task's message")
        .pop()
        .expect("the submit enqueued a message");
    let released = runtime()
        .block_on(backend.release(&lease, Duration::ZERO))
        .expect("failed to release the task's message");
    assert_eq!(
        released,
        Fenced::Written,
        "the copied message goes back to the queue"
    );
    let message: Value = serde_json::from_str(&lease.body).expect("the message is JSON");
    assert_eq!(
        message["row_key"],
        task_id.as_str(),
        "the message names the task"
    );

    let mut daemon = env.start_daemon(&["--concurrency", "1"]);
    let finished = env.wait_one(&task_id, TASK_TIMEOUT);
    assert_eq!(status_of(&finished), "COMPLETED", "{finished:#}");
    assert_eq!(output_of(&finished), json!({"product": 42}));

    enqueue_raw(&env, &[&lease.body]);
    env.wait_for(
        "the duplicate message to be acknowledged",
        TASK_TIMEOUT,
        || {
            let acknowledged = daemon.log().lines().any(|line| {
                line.contains(&task_id) && line.contains("acknowledging duplicate delivery")
            });
            (acknowledged && env.queue_length() == 0).then_some(())
        },
    );

    let after = env.status_json(&task_id);
    assert_eq!(
        status_of(&after),
        "COMPLETED",
        "the status stays COMPLETED after the duplicate: {after:#}"
    );
    assert_eq!(
        after["OutputPayload"], finished["OutputPayload"],
        "the result stays the original one after the duplicate"
    );
    assert_eq!(
        after["Attempt"], 1,
        "the duplicate began no attempt: {after:#}"
    );
    assert_eq!(history_of(&after).len(), 1, "{after:#}");
    assert_eq!(
        after, finished,
        "the duplicate changed no field of the record"
    );
    let finished_rows = env.row_keys(TaskTable::Finished);
    assert_eq!(finished_rows, vec![task_id.clone()], "one finished row");
    assert_eq!(env.row_keys(TaskTable::Active).len(), 0, "active rows");
    assert_eq!(
        env.dead_letters_json().len(),
        0,
        "the duplicate is acknowledged, not dead-lettered"
    );
    assert!(
        daemon.is_alive(),
        "the daemon still runs{}",
        daemon.log_tail()
    );
}

// Leases

/// Eight 7 s tasks on two daemons with a 2 s visibility timeout: each lease is renewed
/// about ten times, each time with the receipt the previous renewal returned. A renewal
/// with an older receipt fails, so the other daemon would take the task over as attempt 2.
fn lease_renewals_keep_one_attempt(env: TestEnv) {
    const TASKS: usize = 8;
    const SLEEP_MS: u64 = 7_000;
    env.register("hostile", &guest("hostile"), &[]);
    let args = ["--concurrency", "2", "--visibility-timeout", "2"];
    let first = env.start_daemon(&args);
    let second = env.start_daemon(&args);

    let payload = json!({"mode": "sleep", "ms": SLEEP_MS}).to_string();
    let ids = env.submit_many("hostile", &payload, &["--count", &TASKS.to_string()]);
    assert_eq!(ids.len(), TASKS);
    let records = env.wait_all(&ids, TASK_TIMEOUT);

    for id in &ids {
        let record = &records[id];
        assert_eq!(status_of(record), "COMPLETED", "{record:#}");
        assert_eq!(
            output_of(record),
            json!({"slept_ms": SLEEP_MS}),
            "{record:#}"
        );
        assert_eq!(record["Attempt"], 1, "the lease was never lost: {record:#}");
        assert_eq!(history_of(record).len(), 1, "one attempt ran: {record:#}");
    }
    let finished = env.row_keys(TaskTable::Finished);
    let distinct: std::collections::HashSet<&String> = finished.iter().collect();
    assert_eq!(finished.len(), TASKS, "one finished row per task");
    assert_eq!(distinct.len(), TASKS, "no task finished twice");
    assert_eq!(env.row_keys(TaskTable::Active).len(), 0, "active rows");
    assert_eq!(env.queue_length(), 0, "queue");
    for daemon in [&first, &second] {
        let log = daemon.log().to_lowercase();
        for symptom in [
            "messagenotfound",
            "message not found",
            "lease lost",
            "outcome discarded",
        ] {
            assert!(
                !log.contains(symptom),
                "a daemon logged {symptom:?}{}",
                daemon.log_tail()
            );
        }
    }
}

/// Short tasks let a daemon lease far ahead of its one slot, so the long tasks that follow
/// them wait for the slot for several visibility timeouts. Their leases must be kept alive
/// while they wait, or another delivery runs them a second time.
fn tasks_leased_ahead_keep_leases(env: TestEnv) {
    const SHORT_TASKS: usize = 300;
    const LONG_TASKS: usize = 6;
    const SLEEP_MS: u64 = 1_000;
    env.register("multiply", &guest("multiply"), &[]);
    env.register("hostile", &guest("hostile"), &[]);
    let daemon = env.start_daemon(&["--concurrency", "1", "--visibility-timeout", "2"]);

    let short = env.submit_many(
        "multiply",
        r#"{"x": 6, "factor": 7}"#,
        &["--count", &SHORT_TASKS.to_string()],
    );
    let payload = json!({"mode": "sleep", "ms": SLEEP_MS}).to_string();
    let long = env.submit_many("hostile", &payload, &["--count", &LONG_TASKS.to_string()]);
    let records = env.wait_all(&long, TASK_TIMEOUT);
    env.wait_all(&short, TASK_TIMEOUT);

    for id in &long {
        let record = &records[id];
        assert_eq!(status_of(record), "COMPLETED", "{record:#}");
        assert_eq!(record["Attempt"], 1, "the lease was never lost: {record:#}");
        assert_eq!(history_of(record).len(), 1, "one attempt ran: {record:#}");
    }
    let log = daemon.log().to_lowercase();
    for symptom in ["lease lost", "outcome discarded"] {
        assert!(
            !log.contains(symptom),
            "the daemon logged {symptom:?}{}",
            daemon.log_tail()
        );
    }
}

// Graceful shutdown

fn sigterm_lets_running_task_finish(env: TestEnv) {
    env.register("hostile", &guest("hostile"), &[]);
    let mut daemon = env.start_daemon(&["--concurrency", "1", "--shutdown-grace", "10"]);
    let id = env.submit("hostile", r#"{"mode": "sleep", "ms": 1500}"#, &[]);
    env.wait_for_status(&id, "RUNNING", TASK_TIMEOUT);

    daemon.signal(libc::SIGTERM);
    let status = daemon
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("the daemon did not exit within 10 s{}", daemon.log_tail()));
    assert_eq!(
        status.code(),
        Some(0),
        "exit status {status:?}{}",
        daemon.log_tail()
    );
    let record = env.status_json(&id);
    assert_eq!(
        status_of(&record),
        "COMPLETED",
        "the task finished before the exit: {record:#}"
    );
    assert_eq!(output_of(&record), json!({"slept_ms": 1500}));
}

fn grace_over_releases_task_at_once(env: TestEnv) {
    env.register("hostile", &guest("hostile"), &[]);
    let mut first = env.start_daemon(&["--concurrency", "1", "--shutdown-grace", "1"]);
    let id = env.submit("hostile", r#"{"mode": "sleep", "ms": 60000}"#, &[]);
    env.wait_for_status(&id, "RUNNING", TASK_TIMEOUT);

    let signalled = Instant::now();
    first.signal(libc::SIGTERM);
    let status = first
        .wait_exit(Duration::from_secs(3))
        .unwrap_or_else(|| panic!("the daemon did not exit within 3 s{}", first.log_tail()));
    assert_eq!(
        status.code(),
        Some(0),
        "exit status {status:?}{}",
        first.log_tail()
    );
    eprintln!("the daemon exited {:?} after SIGTERM", signalled.elapsed());
    assert!(
        first.log().contains("releasing the message"),
        "the interrupted attempt released its message{}",
        first.log_tail()
    );
    // The record went back to CREATED with the release, before any daemon took the task.
    let released = env.status_json(&id);
    assert_eq!(status_of(&released), "CREATED", "{released:#}");
    assert_eq!(released["Attempt"], 1, "{released:#}");
    assert!(
        error_of(&released).contains("interrupted by a daemon shutdown"),
        "{released:#}"
    );
    let history = history_of(&released);
    assert_eq!(history.len(), 1, "{released:#}");
    assert_eq!(history[0]["Interrupted"], true, "{released:#}");

    // Two more attempts of the 60 s sleep hit a 1 s timeout. The interrupted attempt does
    // not count, so both run under `--max-attempts 2`.
    env.register(
        "hostile",
        &guest("hostile"),
        &["--timeout", "1", "--max-attempts", "2", "--backoff", "0.05"],
    );

    // The default 30 s visibility timeout has not passed: only the release lets a second
    // daemon take the task at once.
    let second_started = Utc::now();
    let second = env.start_daemon(&["--concurrency", "1"]);
    let record = env.wait_one(&id, TASK_TIMEOUT);
    assert_ended_with(&record, "ERROR", "deadline exceeded");
    assert_eq!(record["Attempt"], 3, "{record:#}");
    let history = history_of(&record);
    assert_eq!(history.len(), 3, "{record:#}");
    assert!(
        seconds_between(second_started, time_of(&history[1], "StartTime")) < 5.0,
        "the second daemon started attempt 2 at once: {record:#}"
    );
    for entry in &history[1..] {
        let host = entry["HostId"].as_str().unwrap_or("");
        assert!(
            host.ends_with(&format!(":{}", second.pid())),
            "the second daemon runs attempts 2 and 3: {record:#}"
        );
        assert_eq!(entry["Interrupted"], Value::Null, "{record:#}");
    }
    let letters = env.dead_letters_json();
    assert_eq!(letters.len(), 1, "{letters:#?}");
    assert!(
        reason_of(&letters[0])
            .contains("attempt 3 (2 of 2 that count toward the retry policy) failed"),
        "{letters:#?}"
    );
}

fn second_signal_exits_at_once(env: TestEnv) {
    env.register("hostile", &guest("hostile"), &[]);
    let daemon_args = [
        "--concurrency",
        "1",
        "--visibility-timeout",
        "2",
        "--shutdown-grace",
        "30",
    ];
    let mut first = env.start_daemon(&daemon_args);
    let id = env.submit("hostile", r#"{"mode": "sleep", "ms": 60000}"#, &[]);
    env.wait_for_status(&id, "RUNNING", TASK_TIMEOUT);

    first.signal(libc::SIGTERM);
    env.wait_for(
        "the daemon to start its shutdown",
        Duration::from_secs(5),
        || first.log().contains("shutdown requested").then_some(()),
    );
    let signalled = Instant::now();
    first.signal(libc::SIGTERM);
    let status = first.wait_exit(Duration::from_secs(2)).unwrap_or_else(|| {
        panic!(
            "the daemon did not exit within 2 s of the second signal{}",
            first.log_tail()
        )
    });
    eprintln!(
        "the daemon exited {:?} after the second signal",
        signalled.elapsed()
    );
    assert_eq!(
        status.code(),
        Some(130),
        "exit status {status:?}{}",
        first.log_tail()
    );
    assert_eq!(
        status_of(&env.status_json(&id)),
        "RUNNING",
        "the task was not finished"
    );

    // The lease was not released, so the task runs again once it expires.
    let second = env.start_daemon(&daemon_args);
    let record = env.wait_for("the task to run again", Duration::from_secs(10), || {
        let record = env.status_json(&id);
        (record["Status"] == "RUNNING" && record["Attempt"] == 2).then_some(record)
    });
    let host = record["HostId"].as_str().unwrap_or("");
    assert!(host.ends_with(&format!(":{}", second.pid())), "{record:#}");
}

// Sandbox containment

fn sandbox_denies_files_env_and_network(env: TestEnv) {
    env.register("hostile", &guest("hostile"), &[]);
    let _daemon = env.start_daemon(&["--concurrency", "2"]);

    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("failed to open a listener");
    listener
        .set_nonblocking(true)
        .expect("failed to make the listener non-blocking");
    let addr = listener.local_addr().expect("listener address").to_string();
    let secret = env.data_dir().join("secret.txt");
    std::fs::write(&secret, "not for guests").expect("failed to write a file");

    let payloads = [
        json!({"mode": "read-file", "path": "/etc/passwd"}),
        json!({"mode": "read-file", "path": path_str(&secret)}),
        json!({"mode": "read-env"}),
        json!({"mode": "connect", "addr": addr}),
    ];
    let ids: Vec<String> = payloads
        .iter()
        .map(|payload| env.submit("hostile", &payload.to_string(), &[]))
        .collect();
    let records = env.wait_all(&ids, TASK_TIMEOUT);

    for (payload, id) in payloads.iter().zip(&ids) {
        let record = &records[id];
        assert_eq!(status_of(record), "COMPLETED", "{payload}: {record:#}");
        let result = output_of(record);
        match payload["mode"].as_str() {
            Some("read-env") => assert_eq!(result["vars"], json!({}), "{payload}: {result}"),
            _ => assert_eq!(result["ok"], false, "{payload}: {result}"),
        }
    }
    match listener.accept() {
        Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
        Ok((_, peer)) => panic!("a guest connected to the test listener from {peer}"),
        Err(error) => panic!("accept on the test listener failed: {error}"),
    }
}

fn blob_task_reads_only_its_own_input(env: TestEnv) {
    env.register("word-count", &guest("word-count"), &[]);
    let _daemon = env.start_daemon(&["--concurrency", "2"]);

    let texts = ["alpha beta", "gamma delta epsilon"];
    let mut ids = Vec::new();
    for (index, text) in texts.iter().enumerate() {
        let file = env.data_dir().join(format!("input-{index}.txt"));
        std::fs::write(&file, text).expect("failed to write an input file");
        ids.push(env.submit("word-count", "{}", &["--blob", path_str(&file)]));
    }
    let records = env.wait_all(&ids, TASK_TIMEOUT);
    for (text, id) in texts.iter().zip(&ids) {
        let record = &records[id];
        assert_eq!(status_of(record), "COMPLETED", "{record:#}");
        let result = output_of(record);
        assert_eq!(
            result["bytes"],
            text.len(),
            "the task read its own blob: {result}"
        );
        assert_eq!(
            result["total_words"],
            text.split_whitespace().count(),
            "{result}"
        );
    }

    // Other tasks' blobs exist, but no host call names a blob, so this task has none.
    let id = env.submit("word-count", "{}", &[]);
    let record = env.wait_one(&id, TASK_TIMEOUT);
    assert_ended_with(&record, "ERROR", "invalid input");
    assert!(
        error_of(&record).contains("requires an input blob"),
        "{record:#}"
    );
    assert_eq!(
        record["Attempt"], 1,
        "invalid input is not retried: {record:#}"
    );
}

// Submits whose writes the store rejects (C19): the queue is full or down, the task table
// rejects the insert, and on Azure the delete that undoes the message put fails too.

/// Submits made while a write is rejected, as in the case.
const REJECTED_SUBMITS: usize = 20;

/// Starts one task per idempotency key, concurrently, each with an input blob named
/// `<blob prefix>/<key>` in the input container. Returns each call's result, in order.
fn start_with_blobs(
    client: &WorkflowClient,
    keys: &[String],
    blob_prefix: &str,
) -> Vec<bgw::Result<String>> {
    let mut blobs: Vec<std::io::Cursor<Vec<u8>>> = keys
        .iter()
        .map(|key| std::io::Cursor::new(format!("input of {key}").into_bytes()))
        .collect();
    let starts = keys.iter().zip(blobs.iter_mut()).map(|(key, data)| {
        let blob = InputBlob {
            container: None,
            name: Some(format!("{blob_prefix}/{key}")),
            data,
        };
        let options = StartOptions {
            idempotency_key: Some(key.clone()),
            ..StartOptions::default()
        };
        async move {
            client
                .start_activity_with(
                    "multiply",
                    support::DEFAULT_RESOURCE,
                    br#"{"x": 3}"#,
                    Some(blob),
                    &options,
                )
                .await
        }
    });
    runtime().block_on(futures::future::join_all(starts))
}

/// Returns true when the input blob `<blob prefix>/<key>` exists.
fn input_blob_exists(client: &WorkflowClient, blob_prefix: &str, key: &str) -> bool {
    let blob = BlobRef {
        container: INPUT_CONTAINER.to_owned(),
        name: format!("{blob_prefix}/{key}"),
    };
    match client.backend().blobs().open(&blob) {
        Ok(_) => true,
        Err(bgw::Error::NotFound(_)) => false,
        Err(error) => panic!("failed to look for input blob {}: {error}", blob.name),
    }
}

fn rejected_submit_writes_leave_nothing(env: TestEnv) {
    let mut env = env;
    let faults = StoreFaults::install(&mut env);
    env.register("multiply", &guest("multiply"), &[]);
    let mut daemon = env.start_daemon(&["--concurrency", "2"]);
    let client = WorkflowClient::new(env.backend(), "c19");
    let blob_prefix = format!("c19-{}", uuid::Uuid::new_v4().simple());

    for fault in Fault::of_submit(&env) {
        faults.set(fault, true);
        let keys: Vec<String> = (0..REJECTED_SUBMITS)
            .map(|index| format!("{fault:?}-{index}"))
            .collect();
        let results = start_with_blobs(&client, &keys, &blob_prefix);
        for (key, result) in keys.iter().zip(&results) {
            let error = match result {
                Ok(task_id) => panic!("{fault:?}: the submit of {key} started task {task_id}"),
                Err(error) => format!("{error:#}"),
            };
            for expected in faults.error_texts(fault) {
                assert!(
                    error.contains(&expected),
                    "{fault:?}: the error of {key} should contain {expected:?}: {error}"
                );
            }
        }
        if let Some(rejected) = faults.rejected(fault) {
            assert!(
                rejected >= REJECTED_SUBMITS,
                "{fault:?}: the proxy rejected {rejected} requests"
            );
        }

        // Nothing of the rejected submits is left: no record, no message, no input blob.
        assert_eq!(
            env.row_keys(TaskTable::Active),
            Vec::<String>::new(),
            "{fault:?}: active records"
        );
        assert_eq!(env.queue_length(), 0, "{fault:?}: queue");
        for key in &keys {
            assert!(
                !input_blob_exists(&client, &blob_prefix, key),
                "{fault:?}: the input blob of {key} is left"
            );
        }

        let submitted = env.run(&[
            "submit",
            "multiply",
            "--payload",
            r#"{"x": 1}"#,
            "--resource",
            "r",
        ]);
        assert_eq!(submitted.code(), 1, "{fault:?}: bgw submit: {submitted:?}");
        assert!(
            submitted.stderr.contains("failed to submit task 1 of 1"),
            "{fault:?}: {}",
            submitted.stderr
        );
        for expected in faults.error_texts(fault) {
            assert!(
                submitted.stderr.contains(&expected),
                "{fault:?}: bgw submit should print {expected:?}: {}",
                submitted.stderr
            );
        }

        // With the fault gone, the same keys start tasks, which the daemon that ran
        // through the fault completes.
        faults.set(fault, false);
        let task_ids: Vec<String> = start_with_blobs(&client, &keys, &blob_prefix)
            .into_iter()
            .map(|result| result.unwrap_or_else(|error| panic!("{fault:?}: {error:#}")))
            .collect();
        let records = env.wait_all(&task_ids, TASK_TIMEOUT);
        for (task_id, record) in &records {
            assert_eq!(
                status_of(record),
                "COMPLETED",
                "{fault:?} {task_id}: {record:#}"
            );
            assert_eq!(output_of(record), json!({"product": 6}), "{task_id}");
        }
        assert!(
            input_blob_exists(&client, &blob_prefix, &keys[0]),
            "{fault:?}: a started task keeps its input blob"
        );
    }

    assert_eq!(env.dead_letters_json().len(), 0, "no dead letter");
    assert!(
        daemon.is_alive(),
        "the daemon survived the faults{}",
        daemon.log_tail()
    );
    assert!(
        !daemon.log().contains("panicked"),
        "no panic{}",
        daemon.log_tail()
    );
}

/// Returns the dead letter whose reason states that a submit never stored its record.
fn orphan_dead_letter(env: &TestEnv) -> Option<Value> {
    env.dead_letters_json()
        .into_iter()
        .find(|letter| reason_of(letter).contains("never stored the record"))
}

// Azure only: a SQLite submit writes the record and the message in one transaction, so
// no step of it needs undoing.
#[test]
fn azure_orphan_message_of_failed_submit_dead_lettered() {
    let Some(mut env) = TestEnv::azure() else {
        return;
    };
    let faults = StoreFaults::install(&mut env);
    env.register("multiply", &guest("multiply"), &[]);
    let mut daemon = env.start_daemon(&["--concurrency", "2"]);
    let client = WorkflowClient::new(env.backend(), "c19");

    // The insert fails, and so does the delete that would undo the message put before it.
    faults.set(Fault::RecordInsert, true);
    faults.set(Fault::MessageDelete, true);
    let started = runtime().block_on(client.start_activity(
        "multiply",
        support::DEFAULT_RESOURCE,
        br#"{"x": 4}"#,
        None,
    ));
    let error = format!("{:#}", started.expect_err("the insert was rejected"));
    for expected in faults.error_texts(Fault::RecordInsert) {
        assert!(
            error.contains(&expected),
            "error should contain {expected:?}: {error}"
        );
    }
    let rejected_deletes = faults.rejected(Fault::MessageDelete).unwrap_or(0);
    assert!(
        rejected_deletes >= 1,
        "the proxy rejected the delete of the message"
    );
    faults.set(Fault::RecordInsert, false);
    faults.set(Fault::MessageDelete, false);
    assert_eq!(env.queue_length(), 1, "the hidden message stays");
    assert_eq!(
        env.row_keys(TaskTable::Active),
        Vec::<String>::new(),
        "no record was stored"
    );

    // Visible after the submit visibility timeout, the message names no record. The daemon
    // looks again until the submit's requests could no longer store it, then dead-letters
    // the message.
    let letter = env.wait_for(
        "the orphan message to be dead-lettered",
        TASK_TIMEOUT,
        || orphan_dead_letter(&env),
    );
    let reason = reason_of(&letter);
    assert!(reason.contains("no task record with RowKey"), "{letter:#}");
    let dequeue_count = letter["DequeueCount"].as_u64().unwrap_or(0);
    assert!(
        dequeue_count >= 2,
        "the daemon released the message while its record could still be stored: {letter:#}"
    );
    let task_id = letter["RowKey"]
        .as_str()
        .expect("the dead letter names its task");
    let status = env.run(&["status", task_id]);
    assert_eq!(status.code(), 1, "the task does not exist: {status:?}");
    assert!(status.stderr.contains("not found"), "{}", status.stderr);
    env.wait_for("the queue to be empty", TASK_TIMEOUT, || {
        (env.queue_length() == 0).then_some(())
    });
    let created: Vec<Value> = env
        .list_json()
        .into_iter()
        .filter(|record| status_of(record) == "CREATED")
        .collect();
    assert!(created.is_empty(), "no record stays CREATED: {created:#?}");

    // The daemon that ran through the faults completes new tasks.
    let task_ids = env.submit_many("multiply", r#"{"x": 5}"#, &["--count", "20"]);
    let records = env.wait_all(&task_ids, TASK_TIMEOUT);
    for (task_id, record) in &records {
        assert_eq!(status_of(record), "COMPLETED", "{task_id}: {record:#}");
    }
    assert!(
        daemon.is_alive(),
        "the daemon survived the faults{}",
        daemon.log_tail()
    );
}

#[test]
fn azure_record_stored_late_runs_task_once() {
    let Some(mut env) = TestEnv::azure() else {
        return;
    };
    // The message stays hidden for 3 s after the put, and the daemon looks for a missing
    // record until 3 s + 2 × 1 s after it.
    let faults = StoreFaults::install(&mut env);
    env.register("multiply", &guest("multiply"), &[]);
    let mut daemon = env.start_daemon(&["--concurrency", "1", "--visibility-timeout", "2"]);

    // The insert of the record takes 4 s, so the message becomes visible first.
    let proxy = faults.proxy().expect("an Azure environment has a proxy");
    let table = env.settings().active_table_name;
    let slow_insert = proxy.add(
        Action::Delay(Duration::from_secs(4)),
        Box::new(move |request: &Request| {
            request.service == Service::Table
                && request.method == "POST"
                && request.path.ends_with(&format!("/{table}"))
        }),
    );
    let id = env.submit("multiply", r#"{"x": 7}"#, &[]);
    assert_eq!(proxy.hits(slow_insert), 1, "the insert was delayed");
    proxy.remove(slow_insert);

    let record = env.wait_one(&id, TASK_TIMEOUT);
    assert_eq!(status_of(&record), "COMPLETED", "{record:#}");
    assert_eq!(output_of(&record), json!({"product": 14}));
    assert_eq!(
        record["Attempt"], 1,
        "a delivery that found no record is no attempt: {record:#}"
    );
    assert_eq!(history_of(&record).len(), 1, "{record:#}");
    assert!(
        daemon.log().contains("task record not stored yet"),
        "the daemon found the message before its record{}",
        daemon.log_tail()
    );
    assert_eq!(env.dead_letters_json().len(), 0, "no dead letter");
    env.wait_for("the queue to be empty", TASK_TIMEOUT, || {
        (env.queue_length() == 0).then_some(())
    });
    assert!(daemon.is_alive(), "{}", daemon.log_tail());
}

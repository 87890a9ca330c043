//! End-to-end tests: the real `bgw` binary, a real daemon and the example guest components.
//! Each test runs twice, as `sqlite::NAME` on a temporary SQLite data directory and as
//! `azure::NAME` on Azurite with its own tables and queue. Each test starts its own
//! daemon, so tests run in parallel without sharing queues, and every daemon is stopped
//! when its test ends.

mod support;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{guest, output_of, path_str, TaskTable, TestEnv};

support::on_both_backends!(
    multiply_returns_product,
    many_workers_store_each_result,
    word_count_returns_counts_and_csv,
    thumbnail_scales_photo_to_png,
    hostile_tasks_fail_while_others_complete,
    hot_swap_under_task_stream,
    missing_component_fails_only_its_task,
    unregister_finishes_running_fails_queued,
    bad_input_rejected_before_storing,
    input_blob_limit_checked_while_copying,
    corrupt_component_keeps_old_version,
    usage_errors_exit_with_code_2,
    cli_exit_codes_and_lookups,
    result_checks_status_before_output_blob,
    resource_ids_rejected_or_round_trip,
    large_payloads_reach_guest_intact,
    large_payloads_stored_byte_for_byte,
    poison_tasks_do_not_block_healthy_task,
    task_waits_for_late_registration,
    delayed_task_gets_whole_component_grace,
    fuel_and_deadline_stop_endless_guests,
    deep_recursion_fails_next_task_runs,
    prune_deletes_old_finished_tasks,
    times_are_utc_across_time_zones,
    library_leaves_logging_alone,
);

/// Maximum wait for a handful of tasks. Generous, because the tests share few cores.
const TASK_TIMEOUT: Duration = Duration::from_secs(60);

/// Tasks of the full-concurrency test on SQLite and on Azure. Each task costs several
/// HTTP requests to Azurite, so the Azure run is smaller.
const FULL_CONCURRENCY_TASKS: [usize; 2] = [1_000, 200];

/// Worker slots of the full-concurrency test's daemon. On SQLite every worker commits
/// through the daemon's one write connection.
const FULL_CONCURRENCY_SLOTS: &str = "10";

/// Directory of the failure-case data: inputs that broke similar systems.
const CASES_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/cases");

/// Directory of the sample data of the examples.
const EXAMPLE_DATA_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/data");

/// The eight bytes every PNG file starts with.
const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1a, b'\n'];

/// Reads a case data file. Panics when the directory is missing, so a case never passes
/// without its data.
fn case_file(name: &str) -> Vec<u8> {
    let path = Path::new(CASES_DIR).join(name);
    std::fs::read(&path)
        .unwrap_or_else(|error| panic!("failed to read case data file {}: {error}", path.display()))
}

fn example_data(name: &str) -> PathBuf {
    Path::new(EXAMPLE_DATA_DIR).join(name)
}

/// Writes a file into the environment's data directory and returns its path.
fn write_file(env: &TestEnv, name: &str, contents: &[u8]) -> PathBuf {
    let path = env.data_dir().join(name);
    std::fs::write(&path, contents).expect("failed to write a test input file");
    path
}

fn status_of(record: &Value) -> &str {
    record["Status"].as_str().unwrap_or("<no Status>")
}

fn error_of(record: &Value) -> &str {
    record["ErrorMessage"].as_str().unwrap_or("")
}

fn assert_completed(record: &Value) {
    assert_eq!(status_of(record), "COMPLETED", "record: {record:#}");
}

/// Checks that a task ended ERROR with a message containing `expected`, and that the
/// attempt's fuel was recorded.
fn assert_failed_with(record: &Value, expected: &str) {
    assert_eq!(status_of(record), "ERROR", "record: {record:#}");
    assert!(
        error_of(record).contains(expected),
        "ErrorMessage should contain {expected:?}: {record:#}"
    );
}

fn fuel_of(record: &Value) -> u64 {
    record["FuelUsed"]
        .as_u64()
        .unwrap_or_else(|| panic!("FuelUsed is missing: {record:#}"))
}

/// Returns EndTime - StartTime of a finished record.
fn run_time(record: &Value) -> Duration {
    (time_of(record, "EndTime") - time_of(record, "StartTime"))
        .to_std()
        .unwrap_or_else(|_| panic!("EndTime is before StartTime: {record:#}"))
}

/// Returns a time field of a record.
fn time_of(record: &Value, field: &str) -> chrono::DateTime<chrono::FixedOffset> {
    let text = record[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} is missing: {record:#}"));
    chrono::DateTime::parse_from_rfc3339(text)
        .unwrap_or_else(|error| panic!("{field} {text:?} is not RFC 3339: {error}"))
}

/// Returns true for the multibyte case payload on Azurite, whose stored text the test
/// cannot compare.
///
/// NOTE: Azurite 3.35 decodes each chunk of a table request body on its own, so a
/// multibyte character that straddles a chunk boundary is stored as U+FFFD. An entity
/// with the 30,000 'é' of this case is large enough to arrive in several chunks, so its
/// text sometimes differs on Azurite; SQLite runs the full comparison.
fn azurite_may_corrupt(env: &TestEnv, case_name: &str) -> bool {
    env.is_azure() && case_name.contains("multibyte")
}

/// Returns the first character of a resource id that the Azure Table key rules forbid.
fn first_forbidden_char(resource_id: &str) -> Option<char> {
    resource_id.chars().find(|&ch| {
        matches!(ch, '/' | '\\' | '#' | '?')
            || matches!(ch, '\u{0}'..='\u{1f}' | '\u{7f}'..='\u{9f}')
    })
}

/// Returns `length` reproducible bytes that are not a WebAssembly header.
fn noise_bytes(length: usize) -> Vec<u8> {
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    (0..length)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 56) as u8
        })
        .collect()
}

/// Writes a copy of a built guest with a custom section appended, and returns its path:
/// the same code under another digest, as a rebuild of unchanged source can produce.
fn rebuilt_guest(env: &TestEnv, name: &str, build: &str) -> PathBuf {
    let section_name = b"bgw-test-build";
    let mut body = vec![section_name.len() as u8];
    body.extend_from_slice(section_name);
    body.extend_from_slice(build.as_bytes());
    assert!(body.len() < 128, "the section size fits one LEB128 byte");

    let mut wasm = std::fs::read(guest(name)).expect("failed to read the guest component");
    // A custom section: id 0, the size, then the name and the contents.
    wasm.push(0);
    wasm.push(body.len() as u8);
    wasm.extend_from_slice(&body);
    write_file(env, &format!("{name}-build-{build}.wasm"), &wasm)
}

/// Returns the text of the `"payload"` value of a case payload file, exactly as written.
fn raw_payload_of(file: &[u8]) -> String {
    let text = std::str::from_utf8(file).expect("case payload files are UTF-8");
    let key = "\"payload\": ";
    let start = text
        .find(key)
        .expect("case payload file has a \"payload\" key")
        + key.len();
    let end = text.trim_end().len() - 1;
    assert_eq!(
        &text[end..end + 1],
        "}",
        "case payload file ends with its object"
    );
    let raw = text[start..end].to_owned();

    let whole: Value = serde_json::from_str(text).expect("case payload file is JSON");
    let parsed: Value = serde_json::from_str(&raw).expect("payload slice is JSON");
    assert_eq!(
        parsed, whole["payload"],
        "payload slice is the payload value"
    );
    raw
}

fn multiply_returns_product(env: TestEnv) {
    env.register("multiply", &guest("multiply"), &[]);
    let _daemon = env.start_daemon(&["--concurrency", "2"]);

    let default_factor = env.submit("multiply", r#"{"x": 21}"#, &[]);
    let explicit_factor = env.submit("multiply", r#"{"x": 6, "factor": 7}"#, &[]);
    let records = env.wait_all(
        &[default_factor.clone(), explicit_factor.clone()],
        TASK_TIMEOUT,
    );

    for id in [&default_factor, &explicit_factor] {
        let record = &records[id];
        assert_completed(record);
        assert_eq!(output_of(record), json!({"product": 42}), "task {id}");
        assert!(fuel_of(record) > 0, "fuel is recorded: {record:#}");
    }
    let result = env.run_json(&["result", &default_factor]);
    assert_eq!(result, json!({"product": 42}), "`bgw result --json`");
}

fn many_workers_store_each_result(env: TestEnv) {
    let tasks = FULL_CONCURRENCY_TASKS[usize::from(env.is_azure())];
    env.register("multiply", &guest("multiply"), &[]);

    // Every task is queued before the daemon starts, so all of its worker slots are busy
    // from the first lease on. Each x is distinct, so a result stored for the wrong task
    // shows.
    let lines: Vec<String> = (0..tasks).map(|x| json!({ "x": x }).to_string()).collect();
    let payloads = write_file(&env, "payloads.jsonl", lines.join("\n").as_bytes());
    let ids = env.submit_many("multiply", "{}", &["--payloads", path_str(&payloads)]);
    assert_eq!(ids.len(), tasks, "one task id per payload line");
    let mut daemon = env.start_daemon(&["--concurrency", FULL_CONCURRENCY_SLOTS]);
    let records = env.wait_all(&ids, Duration::from_secs(120));

    for (x, id) in ids.iter().enumerate() {
        let record = &records[id];
        assert_completed(record);
        assert_eq!(
            output_of(record),
            json!({"product": 2 * x}),
            "task {id} on line {} has its own result",
            x + 1
        );
        assert_eq!(record["Attempt"], 1, "task {id} ran once: {record:#}");
    }
    let finished = env.row_keys(TaskTable::Finished);
    let distinct: HashSet<&String> = finished.iter().collect();
    assert_eq!(finished.len(), tasks, "finished rows");
    assert_eq!(distinct.len(), tasks, "distinct finished tasks");
    assert_eq!(env.row_keys(TaskTable::Active).len(), 0, "active rows");
    assert_eq!(env.queue_length(), 0, "queue");
    assert!(
        daemon.is_alive(),
        "the daemon still runs{}",
        daemon.log_tail()
    );
}

fn word_count_returns_counts_and_csv(env: TestEnv) {
    env.register("word-count", &guest("word-count"), &[]);
    let _daemon = env.start_daemon(&["--concurrency", "2"]);

    // 10 words, 7 of them unique. The straight and the curly apostrophe make one word.
    let text = "The cat and the hat.\nDon't stop, don\u{2019}t!\nthe end";
    let input = write_file(&env, "words.txt", text.as_bytes());
    let id = env.submit("word-count", r#"{"top": 3}"#, &["--blob", path_str(&input)]);
    let record = env.wait_one(&id, TASK_TIMEOUT);
    assert_completed(&record);

    let result = output_of(&record);
    assert_eq!(result["total_words"], json!(10), "{result}");
    assert_eq!(result["unique_words"], json!(7), "{result}");
    assert_eq!(result["lines"], json!(3), "{result}");
    assert_eq!(result["bytes"], json!(text.len()), "{result}");
    assert_eq!(
        result["top"],
        json!([
            {"word": "the", "count": 3},
            {"word": "don't", "count": 2},
            {"word": "and", "count": 1},
        ]),
        "{result}"
    );
    assert!(
        result.get("version").is_none(),
        "version 1 has no \"version\": {result}"
    );

    let csv_path = env.data_dir().join("words.csv");
    env.run_ok(&["result", &id, "--output-blob", path_str(&csv_path)]);
    let csv = std::fs::read_to_string(&csv_path).expect("the output blob was saved");
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(
        rows,
        [
            "word,count",
            "the,3",
            "don't,2",
            "and,1",
            "cat,1",
            "end,1",
            "hat,1",
            "stop,1",
        ],
        "CSV output blob"
    );
}

fn thumbnail_scales_photo_to_png(env: TestEnv) {
    env.register("thumbnail", &guest("thumbnail"), &[]);
    let _daemon = env.start_daemon(&["--concurrency", "2"]);

    let photo = example_data("chelsea.jpg");
    let id = env.submit(
        "thumbnail",
        r#"{"max_width": 128, "max_height": 128}"#,
        &["--blob", path_str(&photo)],
    );
    let record = env.wait_one(&id, TASK_TIMEOUT);
    assert_completed(&record);

    let result = output_of(&record);
    assert_eq!(result["source_width"], json!(451), "{result}");
    assert_eq!(result["source_height"], json!(300), "{result}");
    assert_eq!(result["width"], json!(128), "{result}");
    assert_eq!(result["height"], json!(85), "{result}");
    assert_eq!(result["format"], json!("jpeg"), "{result}");

    let png_path = env.data_dir().join("thumbnail.png");
    env.run_ok(&["result", &id, "--output-blob", path_str(&png_path)]);
    let png = std::fs::read(&png_path).expect("the output blob was saved");
    assert_eq!(
        result["output_bytes"],
        json!(png.len()),
        "output_bytes is the blob size"
    );
    assert!(
        png.len() > 24,
        "PNG of {} bytes is too short for an IHDR chunk",
        png.len()
    );
    assert_eq!(png[..8], PNG_SIGNATURE, "PNG signature");
    assert_eq!(&png[12..16], b"IHDR", "the first chunk is IHDR");
    let width = u32::from_be_bytes(png[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(png[20..24].try_into().unwrap());
    assert_eq!((width, height), (128, 85), "IHDR size");
}

fn hostile_tasks_fail_while_others_complete(env: TestEnv) {
    let hostile = guest("hostile");
    env.register("spin-fuel", &hostile, &["--fuel", "50000000"]);
    env.register(
        "spin-deadline",
        &hostile,
        &["--fuel", "1000000000000000", "--timeout", "1"],
    );
    env.register("memory-hog", &hostile, &["--memory", "64"]);
    env.register("hostile", &hostile, &[]);
    env.register("multiply", &guest("multiply"), &[]);
    let mut daemon = env.start_daemon(&["--concurrency", "2"]);

    let cases = [
        ("spin-fuel", json!({"mode": "spin"}), "fuel limit exceeded"),
        (
            "spin-deadline",
            json!({"mode": "spin"}),
            "deadline exceeded",
        ),
        (
            "spin-deadline",
            json!({"mode": "sleep", "ms": 60000}),
            "deadline exceeded",
        ),
        (
            "memory-hog",
            json!({"mode": "memory-hog"}),
            "memory limit exceeded",
        ),
        ("hostile", json!({"mode": "recurse"}), "stack overflow"),
        (
            "hostile",
            json!({"mode": "panic"}),
            "guest panicked: hostile guest panicked on purpose",
        ),
        ("hostile", json!({"mode": "trap"}), "guest trapped"),
    ];
    let mut hostile_ids = Vec::new();
    let mut multiply_ids = Vec::new();
    for (index, (activity_type, payload, _)) in cases.iter().enumerate() {
        hostile_ids.push(env.submit(activity_type, &payload.to_string(), &[]));
        for x in [2 * index, 2 * index + 1] {
            let id = env.submit("multiply", &json!({"x": x}).to_string(), &[]);
            multiply_ids.push((id, x));
        }
    }
    let mut all: Vec<String> = hostile_ids.clone();
    all.extend(multiply_ids.iter().map(|(id, _)| id.clone()));
    let records = env.wait_all(&all, TASK_TIMEOUT);

    for ((activity_type, payload, expected), id) in cases.iter().zip(&hostile_ids) {
        let record = &records[id];
        assert_failed_with(record, expected);
        let fuel = fuel_of(record);
        assert!(fuel > 0, "{activity_type} {payload}: FuelUsed is {fuel}");
    }
    assert_eq!(
        fuel_of(&records[&hostile_ids[0]]),
        50_000_000,
        "spin is charged the whole budget"
    );
    assert!(
        error_of(&records[&hostile_ids[3]]).contains("64 MiB"),
        "memory message names the limit"
    );
    for (id, x) in &multiply_ids {
        let record = &records[id];
        assert_completed(record);
        assert_eq!(output_of(record), json!({"product": 2 * x}), "task {id}");
    }
    assert!(
        daemon.is_alive(),
        "the daemon survives every hostile guest{}",
        daemon.log_tail()
    );
}

fn hot_swap_under_task_stream(env: TestEnv) {
    const MIN_TASKS: usize = 300;
    const MAX_TASKS: usize = 600;
    const BATCH: usize = 10;
    /// Tasks submitted this long after `register` returned must run on the new version.
    const SWAP_SETTLE: Duration = Duration::from_millis(1500);

    let v1 = env.register("word-count", &guest("word-count"), &[]);
    let v1_digest = v1["digest"].as_str().expect("digest").to_owned();
    let input = write_file(&env, "stream.txt", b"alpha beta beta gamma\n");
    let _daemon = env.start_daemon(&["--concurrency", "2"]);

    let submitted = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let batches: Mutex<Vec<(Instant, Vec<String>)>> = Mutex::new(Vec::new());
    let mut registered_at = None;
    let mut v2_digest = String::new();

    std::thread::scope(|scope| {
        scope.spawn(|| {
            // Bounded by MAX_TASKS and by time, so it ends even when the main thread panics.
            let started = Instant::now();
            while !stop.load(Ordering::SeqCst)
                && submitted.load(Ordering::SeqCst) < MAX_TASKS
                && started.elapsed() < Duration::from_secs(60)
            {
                let before = Instant::now();
                let ids = env.submit_many(
                    "word-count",
                    r#"{"top": 2}"#,
                    &["--blob", path_str(&input), "--count", &BATCH.to_string()],
                );
                submitted.fetch_add(ids.len(), Ordering::SeqCst);
                batches.lock().unwrap().push((before, ids));
                std::thread::sleep(Duration::from_millis(40));
            }
        });

        let waiting = Instant::now();
        while submitted.load(Ordering::SeqCst) < MIN_TASKS / 3 {
            assert!(
                waiting.elapsed() < Duration::from_secs(30),
                "the submitter did not reach {} tasks in 30 s",
                MIN_TASKS / 3
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let v2 = env.register("word-count", &guest("word-count-v2"), &[]);
        let now = Instant::now();
        registered_at = Some(now);
        v2_digest = v2["digest"].as_str().expect("digest").to_owned();

        while submitted.load(Ordering::SeqCst) < MIN_TASKS || now.elapsed() < SWAP_SETTLE * 2 {
            if submitted.load(Ordering::SeqCst) >= MAX_TASKS {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        stop.store(true, Ordering::SeqCst);
    });
    let registered_at = registered_at.expect("v2 was registered");
    assert_ne!(v1_digest, v2_digest, "the two builds differ");

    let batches = batches.into_inner().unwrap();
    let ids: Vec<String> = batches.iter().flat_map(|(_, ids)| ids.clone()).collect();
    assert!(
        ids.len() >= MIN_TASKS,
        "only {} tasks were submitted",
        ids.len()
    );
    let records = env.wait_all(&ids, Duration::from_secs(90));
    assert_eq!(records.len(), ids.len(), "every task has a record");

    let failed: Vec<&Value> = records
        .values()
        .filter(|r| status_of(r) != "COMPLETED")
        .collect();
    assert!(
        failed.is_empty(),
        "{} tasks did not complete, first: {:#}",
        failed.len(),
        failed[0]
    );

    let digests = [v1_digest.as_str(), v2_digest.as_str()];
    let mut seen = HashSet::new();
    for (id, record) in &records {
        let digest = record["ComponentDigest"].as_str().unwrap_or("");
        assert!(
            digests.contains(&digest),
            "task {id} ran unknown digest {digest:?}"
        );
        seen.insert(digest.to_owned());
        let result = output_of(record);
        let has_v2_field = result.get("version") == Some(&json!(2));
        assert_eq!(
            has_v2_field,
            digest == v2_digest,
            "task {id}: result {result} does not match digest {digest}"
        );
        assert_eq!(result["total_words"], json!(4), "task {id}: {result}");
    }
    assert!(seen.contains(&v1_digest), "no task ran on v1");
    assert!(seen.contains(&v2_digest), "no task ran on v2");

    let late: Vec<&String> = batches
        .iter()
        .filter(|(submitted_at, _)| *submitted_at > registered_at + SWAP_SETTLE)
        .flat_map(|(_, ids)| ids)
        .collect();
    assert!(
        !late.is_empty(),
        "no batch was submitted {SWAP_SETTLE:?} after the swap"
    );
    for id in late {
        let digest = records[id]["ComponentDigest"].as_str().unwrap_or("");
        assert_eq!(
            digest, v2_digest,
            "task {id} submitted after the swap ran on v1"
        );
    }

    let versions = env.run_json(&["activities", "word-count"]);
    let versions = versions
        .as_array()
        .expect("`bgw activities --json` prints an array");
    assert_eq!(versions.len(), 2, "two versions: {versions:#?}");
    let current: Vec<&Value> = versions
        .iter()
        .filter(|v| v["current"] == json!(true))
        .collect();
    assert_eq!(current.len(), 1, "one current version: {versions:#?}");
    assert_eq!(current[0]["digest"], json!(v2_digest), "v2 is current");
    assert_eq!(current[0]["version"], json!(2), "v2 is version 2");

    env.run_ok(&["rollback", "word-count"]);
    let versions = env.run_json(&["activities", "word-count"]);
    let current: Vec<&Value> = versions
        .as_array()
        .expect("array")
        .iter()
        .filter(|v| v["current"] == json!(true))
        .collect();
    assert_eq!(
        current.len(),
        1,
        "one current version after rollback: {versions:#}"
    );
    assert_eq!(
        current[0]["digest"],
        json!(v1_digest),
        "v1 is current after rollback"
    );

    // The daemon polls the registry every 50 ms, so one second is ample.
    std::thread::sleep(Duration::from_secs(1));
    let after = env.submit("word-count", r#"{"top": 2}"#, &["--blob", path_str(&input)]);
    let record = env.wait_one(&after, TASK_TIMEOUT);
    assert_completed(&record);
    assert_eq!(
        record["ComponentDigest"],
        json!(v1_digest),
        "a task after rollback runs v1"
    );
    assert!(
        output_of(&record).get("version").is_none(),
        "v1 result has no \"version\""
    );
}

fn missing_component_fails_only_its_task(env: TestEnv) {
    env.register("multiply", &guest("multiply"), &[]);
    // One worker slot: the tasks behind the failing one can only run if it does not block.
    let _daemon = env.start_daemon(&["--concurrency", "1", "--missing-component-grace", "1"]);

    // The submit succeeds with a warning, because the type may be registered next.
    let submitted = env.run(&[
        "submit",
        "ghost-activity",
        "--resource",
        support::DEFAULT_RESOURCE,
        "--payload",
        r#"{"x": 1}"#,
    ]);
    assert_eq!(submitted.code(), 0, "{submitted:?}");
    let warning = "warning: no component is registered for activity type \"ghost-activity\": \
                   the task waits up to the daemon's --missing-component-grace";
    assert!(submitted.stderr.contains(warning), "{}", submitted.stderr);
    let missing = submitted.stdout.trim().to_owned();
    let registered = env.run(&["submit", "multiply", "--resource", "res-1"]);
    assert_eq!(registered.stderr, "", "no warning for a registered type");

    let behind: Vec<String> = (0..5)
        .map(|x| env.submit("multiply", &json!({"x": x}).to_string(), &[]))
        .collect();
    let mut all = vec![missing.clone(), registered.stdout.trim().to_owned()];
    all.extend(behind.iter().cloned());
    let records = env.wait_all(&all, TASK_TIMEOUT);

    let record = &records[&missing];
    assert_failed_with(record, "no component registered");
    assert!(
        error_of(record).contains("\"ghost-activity\""),
        "the message names the type: {record:#}"
    );
    for (x, id) in behind.iter().enumerate() {
        assert_completed(&records[id]);
        assert_eq!(
            output_of(&records[id]),
            json!({"product": 2 * x}),
            "task {id}"
        );
    }
}

/// Runs a hot swap, then `unregister` while tasks run and others wait. Running tasks
/// finish on the version they began with, and later ones run the new build. Every task
/// still queued ends ERROR with a dead letter, so none leaves the queue without an outcome.
fn unregister_finishes_running_fails_queued(env: TestEnv) {
    const TASKS: usize = 15;
    const SLOTS: usize = 3;
    /// Longer than the daemon's 50 ms registry poll, with room for a loaded machine.
    const SETTLE: Duration = Duration::from_millis(1000);

    let v1 = env.register("sleeper", &guest("hostile"), &[]);
    let v2_file = rebuilt_guest(&env, "hostile", "2");
    // A daemon leases ahead as many tasks as its slots run in a quarter of the visibility
    // timeout, and such a task begins its attempt on the version current at its lease. A
    // quarter of 4 s is shorter than one 2 s task, so no task is leased ahead, and the
    // tasks beyond the slots are still queued when the type is unregistered.
    let _daemon = env.start_daemon(&[
        "--concurrency",
        &SLOTS.to_string(),
        "--missing-component-grace",
        "2",
        "--visibility-timeout",
        "4",
    ]);
    let ids = env.submit_many(
        "sleeper",
        r#"{"mode": "sleep", "ms": 2000}"#,
        &["--count", &TASKS.to_string()],
    );
    let running_on = |records: &[Value], digest: &Value| -> Vec<String> {
        records
            .iter()
            .filter(|r| status_of(r) == "RUNNING" && &r["ComponentDigest"] == digest)
            .map(|r| r["RowKey"].as_str().unwrap_or("").to_owned())
            .collect()
    };

    // The first tasks run on v1, then v2 replaces it while they run.
    let first_wave = env.wait_for("every slot to run a v1 task", TASK_TIMEOUT, || {
        let running = running_on(&env.list_json(), &v1["digest"]);
        (running.len() == SLOTS).then_some(running)
    });
    let v2 = env.register("sleeper", &v2_file, &[]);
    let swapped_at = chrono::Utc::now();
    assert_ne!(v1["digest"], v2["digest"], "the rebuild has a new digest");
    env.wait_for("a task to run on v2", TASK_TIMEOUT, || {
        (!running_on(&env.list_json(), &v2["digest"]).is_empty()).then_some(())
    });

    // Unregister while v2 tasks run and others wait in the queue.
    let before: Vec<Value> = env.list_json();
    let unregistered = env.run_json(&["unregister", "sleeper"]);
    assert_eq!(unregistered["version"], json!(2), "{unregistered:#}");
    assert_eq!(unregistered["current"], json!(false), "{unregistered:#}");
    std::thread::sleep(SETTLE);
    let after: Vec<Value> = env.list_json();
    // `submit` accepts the type as any other, and the task fails as the queued ones do.
    let submitted_later = env.submit("sleeper", r#"{"mode": "sleep", "ms": 10}"#, &[]);
    let mut ids = ids;
    ids.push(submitted_later.clone());
    let records = env.wait_all(&ids, TASK_TIMEOUT);
    assert_failed_with(
        &records[&submitted_later],
        "no component registered for activity type \"sleeper\"",
    );

    for id in &first_wave {
        let record = &records[id];
        assert_completed(record);
        assert_eq!(record["ComponentDigest"], v1["digest"], "{id} ran v1");
        assert_eq!(record["ComponentVersion"], json!(1), "{id}: {record:#}");
    }
    for earlier in before.iter().filter(|r| status_of(r) == "RUNNING") {
        let id = earlier["RowKey"].as_str().unwrap_or("");
        assert_completed(&records[id]);
        assert_eq!(
            records[id]["ComponentDigest"], earlier["ComponentDigest"],
            "{id} finished on the version it ran on when the type was unregistered"
        );
    }
    let queued: Vec<&str> = after
        .iter()
        .filter(|r| matches!(status_of(r), "CREATED" | "ERROR"))
        .map(|r| r["RowKey"].as_str().unwrap_or(""))
        .collect();
    assert!(
        !queued.is_empty(),
        "no task was still queued after the unregistration: {after:#?}"
    );
    for id in &queued {
        assert_failed_with(
            &records[*id],
            "no component registered for activity type \"sleeper\"",
        );
    }

    let settled_swap = swapped_at + chrono::Duration::from_std(SETTLE).expect("small");
    let mut failed = Vec::new();
    let mut ran_v2 = 0;
    for (id, record) in &records {
        match status_of(record) {
            "COMPLETED" if record["ComponentDigest"] == v2["digest"] => {
                assert_eq!(record["ComponentVersion"], json!(2), "{id}: {record:#}");
                ran_v2 += 1;
            }
            "COMPLETED" => {
                assert_eq!(record["ComponentDigest"], v1["digest"], "{id}: {record:#}");
                assert_eq!(record["ComponentVersion"], json!(1), "{id}: {record:#}");
                let started = record["StartTime"].as_str().unwrap_or("");
                let started = chrono::DateTime::parse_from_rfc3339(started)
                    .unwrap_or_else(|error| panic!("{id}: StartTime {started:?}: {error}"));
                assert!(
                    started < settled_swap,
                    "{id} started on v1 after the swap had settled: {record:#}"
                );
            }
            _ => {
                assert_failed_with(record, "no component registered for activity type");
                failed.push(id.clone());
            }
        }
    }
    assert!(ran_v2 > 0, "no task completed on v2");

    // Each failed task has a dead letter, and no message is left in the queue.
    let letters = env.dead_letters_json();
    let lettered: HashSet<&str> = letters
        .iter()
        .map(|letter| letter["RowKey"].as_str().unwrap_or(""))
        .collect();
    for id in &failed {
        assert!(
            lettered.contains(id.as_str()),
            "{id} has no dead letter: {letters:#?}"
        );
    }
    assert_eq!(
        letters.len(),
        failed.len(),
        "one dead letter per failed task: {letters:#?}"
    );
    assert_eq!(env.queue_length(), 0, "no message is left in the queue");

    // The history is kept, and rollback makes v2 current again for a requeued task.
    let versions = env.run_json(&["activities", "sleeper"]);
    let versions = versions
        .as_array()
        .expect("`bgw activities --json` prints an array");
    assert_eq!(versions.len(), 2, "{versions:#?}");
    assert!(
        versions.iter().all(|v| v["current"] == json!(false)),
        "no version is current: {versions:#?}"
    );
    let restored = env.run_json(&["rollback", "sleeper"]);
    assert_eq!(restored["digest"], v2["digest"], "{restored:#}");
    std::thread::sleep(SETTLE);
    let letter_id = letters[0]["Id"].as_str().expect("a dead letter has an Id");
    env.run_ok(&["requeue", letter_id]);
    let task_id = letters[0]["RowKey"]
        .as_str()
        .expect("the dead letter names its task");
    let record = env.wait_for_status(task_id, "COMPLETED", TASK_TIMEOUT);
    assert_eq!(record["ComponentDigest"], v2["digest"], "{record:#}");

    let unknown = env.run(&["unregister", "never-registered"]);
    assert_eq!(unknown.code(), 1, "{unknown:?}");
    assert!(
        unknown
            .stderr
            .contains("\"never-registered\" is not registered"),
        "the error names the type: {}",
        unknown.stderr
    );
}

fn bad_input_rejected_before_storing(env: TestEnv) {
    let cases: [(&str, &str, &str, &[&str]); 6] = [
        (
            "malformed JSON",
            "multiply",
            r#"{"x":"#,
            &["payload is not valid JSON", "EOF"],
        ),
        (
            "an array",
            "multiply",
            "[1, 2]",
            &["must be a JSON object", "an array"],
        ),
        (
            "a string",
            "multiply",
            r#""text""#,
            &["must be a JSON object", "a string"],
        ),
        (
            "a missing payload file",
            "multiply",
            "@/nonexistent/payload.json",
            &["failed to read payload file"],
        ),
        (
            "an invalid activity type",
            "bad type",
            "{}",
            &["activity type", "' ' (U+0020)"],
        ),
        (
            "deep nesting",
            "multiply",
            &format!("{}{}", "[".repeat(100), "]".repeat(100)),
            &["limit of 64 levels"],
        ),
    ];
    for (what, activity_type, payload, expected) in cases {
        let result = env.run(&[
            "submit",
            activity_type,
            "--resource",
            "res-1",
            "--payload",
            payload,
        ]);
        // Invalid values are bad usage; a file that cannot be read is a failed command.
        let expected_code = if what == "a missing payload file" {
            1
        } else {
            2
        };
        assert_eq!(result.code(), expected_code, "{what}: {result:?}");
        for text in expected {
            assert!(
                result.stderr.contains(text),
                "{what}: stderr lacks {text:?}: {}",
                result.stderr
            );
        }
    }

    let result = env.run(&[
        "submit",
        "multiply",
        "--resource",
        "res/1",
        "--payload",
        "{}",
    ]);
    assert_eq!(result.code(), 2, "{result:?}");
    assert!(
        result.stderr.contains("'/' (U+002F)"),
        "names the character: {}",
        result.stderr
    );

    // A directory as the blob is rejected before a task starts, naming the read that failed.
    let directory = env.data_dir().join("a-directory");
    std::fs::create_dir(&directory).unwrap();
    let result = env.run(&[
        "submit",
        "multiply",
        "--resource",
        "res-1",
        "--blob",
        path_str(&directory),
    ]);
    assert_eq!(result.code(), 1, "{result:?}");
    let expected = format!(
        "failed to read blob file {}: it is a directory, not a file",
        directory.display()
    );
    assert!(result.stderr.contains(&expected), "{}", result.stderr);

    // Endless files are cut off one byte past their limit, not read into memory, and a
    // deadline that ends before the delay is rejected.
    let rejected: [(&str, &[&str], &str); 4] = [
        (
            "a payload file",
            &[
                "submit",
                "multiply",
                "--resource",
                "res-1",
                "--payload",
                "@/dev/zero",
            ],
            "payload file /dev/zero is larger than the maximum of 1048576 bytes (1 MiB)",
        ),
        (
            "a file of payloads",
            &[
                "submit",
                "multiply",
                "--resource",
                "res-1",
                "--payloads",
                "/dev/zero",
            ],
            "invalid payload on line 1 of /dev/zero: it is longer than the maximum of 1048576 \
             bytes (1 MiB)",
        ),
        (
            "a component",
            &["register", "endless", "/dev/zero"],
            "component /dev/zero is larger than the maximum of 134217728 bytes (128 MiB)",
        ),
        (
            "a deadline before the delay ends",
            &[
                "submit",
                "multiply",
                "--resource",
                "res-1",
                "--delay",
                "5",
                "--deadline",
                "2",
            ],
            "invalid --deadline 2: the task may not start until 5.000 s from now",
        ),
    ];
    for (what, args, expected) in rejected {
        let result = env.run(args);
        assert_eq!(result.code(), 2, "{what}: {result:?}");
        assert!(
            result.stderr.contains(expected),
            "{what}: stderr lacks {expected:?}: {}",
            result.stderr
        );
    }

    // Every submit was rejected before the store was opened. On SQLite there is no
    // database file at all; on Azure the tables and the queue hold nothing.
    if env.is_azure() {
        assert_eq!(
            env.list_json(),
            Vec::<Value>::new(),
            "no rejected submit stored a task"
        );
        assert_eq!(
            env.queue_length(),
            0,
            "no rejected submit enqueued a message"
        );
    } else {
        let listed = env.run(&["list"]);
        assert_eq!(listed.code(), 1, "{listed:?}");
        assert!(
            listed.stderr.contains("no bgw database"),
            "no rejected submit created a store: {}",
            listed.stderr
        );
    }

    let file_payload = r#"{"x": 5, "factor": 3}"#;
    let file = write_file(&env, "payload.json", file_payload.as_bytes());
    let id = env.submit("multiply", &format!("@{}", path_str(&file)), &[]);
    let record = env.status_json(&id);
    assert_eq!(status_of(&record), "CREATED", "{record:#}");
    let stored: Value = serde_json::from_str(record["InputPayload"].as_str().unwrap()).unwrap();
    assert_eq!(
        stored,
        json!({"x": 5, "factor": 3}),
        "the file's payload is stored"
    );
}

/// An input blob over `submit.max_input_blob_bytes` is rejected with exit code 2 and
/// leaves no task and no blob, whether it comes from a device, a pipe or a regular file.
fn input_blob_limit_checked_while_copying(env: TestEnv) {
    const LIMIT: usize = 1024 * 1024;
    std::fs::write(
        env.data_dir().join("bgw.toml"),
        format!("[submit]\nmax_input_blob_bytes = {LIMIT}\n"),
    )
    .unwrap();
    let submit_blob = |blob: &str, extra: &[&str]| {
        let mut args = vec!["submit", "multiply", "--resource", "r", "--blob", blob];
        args.extend_from_slice(extra);
        env.run(&args)
    };
    let submit_from_pipe = |size: usize| -> support::CommandResult {
        let mut child = stdin_blob_submit(&env)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("failed to start the bgw binary");
        let mut stdin = child.stdin.take().expect("stdin is piped");
        let writer = std::thread::spawn(move || {
            use std::io::Write;
            // The submit stops reading at the limit, and the write then fails.
            let _ = stdin.write_all(&vec![b'z'; size]);
        });
        let output = child.wait_with_output().expect("failed to wait for bgw");
        writer.join().expect("the pipe writer panicked");
        output.into()
    };
    let over_limit = format!("input blob exceeds the limit of {LIMIT} bytes");
    let stopped_at = format!("the copy stopped after {} bytes", LIMIT + 1);

    // A device has no size, so the copy finds the limit.
    let device = submit_blob("/dev/zero", &[]);
    assert_eq!(device.code(), 2, "{device:?}");
    assert!(device.stderr.contains(&over_limit), "{}", device.stderr);
    assert!(device.stderr.contains(&stopped_at), "{}", device.stderr);
    let bulk = submit_blob("/dev/zero", &["--count", "3"]);
    assert_eq!(bulk.code(), 2, "{bulk:?}");
    assert!(bulk.stderr.contains(&over_limit), "{}", bulk.stderr);

    let piped = submit_from_pipe(LIMIT + 1);
    assert_eq!(piped.code(), 2, "{piped:?}");
    assert!(piped.stderr.contains(&stopped_at), "{}", piped.stderr);

    // A regular file is checked before it is copied, and its error gives its size.
    let large = write_file(&env, "large.bin", &vec![b'z'; LIMIT + 1]);
    let file = submit_blob(path_str(&large), &[]);
    assert_eq!(file.code(), 2, "{file:?}");
    let expected = format!(
        "is {} bytes, over the input blob limit of {LIMIT} bytes",
        LIMIT + 1
    );
    assert!(file.stderr.contains(&expected), "{}", file.stderr);
    assert!(env.list_json().is_empty(), "no rejected submit left a task");
    if !env.is_azure() {
        let blobs = env.data_dir().join("blobs");
        let input_blobs = std::fs::read_dir(blobs.join("bgw-input")).map_or(0, |dir| dir.count());
        assert_eq!(input_blobs, 0, "no input blob is left");
        let temp_files = std::fs::read_dir(blobs.join(".tmp")).map_or(0, |dir| dir.count());
        assert_eq!(temp_files, 0, "no partial blob is left");
    }

    // A blob of exactly the limit is accepted, from a pipe and from a file.
    let at_limit = submit_from_pipe(LIMIT);
    assert_eq!(at_limit.code(), 0, "{at_limit:?}");
    let exact = write_file(&env, "exact.bin", &vec![b'z'; LIMIT]);
    let from_file = submit_blob(path_str(&exact), &[]);
    assert_eq!(from_file.code(), 0, "{from_file:?}");
    let tasks = env.list_json();
    assert_eq!(tasks.len(), 2, "{tasks:#?}");
}

fn corrupt_component_keeps_old_version(env: TestEnv) {
    let original = env.register("calc", &guest("multiply"), &[]);

    let mut truncated = support::guest_bytes("multiply");
    truncated.truncate(truncated.len() / 2);
    // The empty component is valid but exports no `run`, so it belongs to another world.
    let empty_component = b"\0asm\x0d\0\x01\0".to_vec();
    let cases = [
        ("random bytes", noise_bytes(4096), "not a WebAssembly file"),
        ("a truncated component", truncated, "invalid component"),
        (
            "a core module",
            b"\0asm\x01\0\0\0".to_vec(),
            "core WebAssembly module",
        ),
        (
            "a component of another world",
            empty_component,
            "does not fit world",
        ),
    ];
    for (index, (what, bytes, expected)) in cases.into_iter().enumerate() {
        let file = write_file(&env, &format!("corrupt-{index}.wasm"), &bytes);
        let result = env.run(&["register", "calc", path_str(&file)]);
        assert_eq!(result.code(), 1, "{what}: {result:?}");
        assert!(
            result.stderr.contains(expected),
            "{what}: stderr lacks {expected:?}: {}",
            result.stderr
        );
        assert!(
            result.stderr.contains("failed to register"),
            "{what}: {}",
            result.stderr
        );

        let versions = env.run_json(&["activities", "calc"]);
        assert_eq!(
            versions.as_array().map(Vec::len),
            Some(1),
            "{what}: {versions:#}"
        );
        assert_eq!(
            versions[0]["digest"], original["digest"],
            "{what}: old version kept"
        );
        assert_eq!(
            versions[0]["current"],
            json!(true),
            "{what}: old version current"
        );
    }
}

fn usage_errors_exit_with_code_2(env: TestEnv) {
    let component = path_str(&guest("multiply")).to_owned();
    let register = |flag: &'static str, value: &'static str| -> Vec<String> {
        ["register", "multiply", &component, flag, value]
            .map(str::to_owned)
            .to_vec()
    };
    // Each numeric flag names itself and its range, for a value too large to store, a
    // negative one and text.
    let range_cases = [
        (
            register("--fuel", "18446744073709551615"),
            "'--fuel <N>': it must be a whole number from 1 to 9223372036854775807",
        ),
        (
            register("--fuel", "-1"),
            "'--fuel <N>': it must be a whole number from 1 to 9223372036854775807",
        ),
        (
            register("--max-output", "18446744073709551615"),
            "'--max-output <BYTES>': it must be a whole number from 0 to 9223372036854775807",
        ),
        (
            register("--memory", "4097"),
            "'--memory <MIB>': it must be a whole number from 1 to 4096",
        ),
        (
            register("--timeout", "ten"),
            "'--timeout <SECS>': it must be a whole number from 1 to 604800",
        ),
        (
            register("--max-attempts", "101"),
            "'--max-attempts <N>': it must be a whole number from 1 to 100",
        ),
        (
            ["daemon", "--concurrency", "-1"]
                .map(str::to_owned)
                .to_vec(),
            "'--concurrency <N>': it must be a whole number from 1 to 1024",
        ),
        // The largest values that a tokio semaphore and an `Instant` cannot take.
        (
            ["daemon", "--concurrency", "18446744073709551615"]
                .map(str::to_owned)
                .to_vec(),
            "'--concurrency <N>': it must be a whole number from 1 to 1024",
        ),
        (
            ["daemon", "--concurrency", "1025"]
                .map(str::to_owned)
                .to_vec(),
            "'--concurrency <N>': it must be a whole number from 1 to 1024",
        ),
        (
            ["daemon", "--visibility-timeout", "9223372036854775807"]
                .map(str::to_owned)
                .to_vec(),
            "'--visibility-timeout <SECS>': it must be a whole number from 1 to 604800",
        ),
        (
            ["--queue", "Tasks", "list"].map(str::to_owned).to_vec(),
            "--queue: invalid queue name \"Tasks\"",
        ),
    ];
    for (args, expected) in range_cases {
        let result = env.run(&args);
        assert_eq!(result.code(), 2, "bgw {args:?}: {result:?}");
        assert!(
            result.stderr.contains(expected),
            "bgw {args:?}: stderr lacks {expected:?}: {}",
            result.stderr
        );
    }

    let long_key = "k".repeat(300);
    let cases: [(&[&str], &str); 11] = [
        (&["frobnicate"], "unrecognized subcommand"),
        (&["submit", "multiply"], "--resource"),
        (&["register", "multiply"], "<FILE>"),
        (
            &["submit", "multiply", "--resource", "r", "--count", "0"],
            "'--count <N>': it must be a whole number from 1 to 10000000",
        ),
        (&["list", "--status", "DONE"], "invalid status"),
        (&["status"], "<TASK_ID>"),
        // A negative number is read as a value, so the message names the range.
        (
            &["submit", "multiply", "--resource", "r", "--delay", "-5"],
            "invalid --delay -5: it must be between 0 and",
        ),
        (&["prune", "--older-than", "-1"], "invalid --older-than -1"),
        (
            &[
                "submit",
                "multiply",
                "--resource",
                "r",
                "--deadline",
                "0x10",
            ],
            "'--deadline <SECS>': it must be a decimal number of seconds, such as 1.5, more \
             than 0 and at most 2592000",
        ),
        (
            &[
                "submit",
                "multiply",
                "--resource",
                "r",
                "--idempotency-key",
                "",
            ],
            "invalid idempotency key of 0 bytes: it must have 1 to 256 bytes",
        ),
        (
            &[
                "submit",
                "multiply",
                "--resource",
                "r",
                "--idempotency-key",
                &long_key,
            ],
            "invalid idempotency key of 300 bytes: it must have 1 to 256 bytes",
        ),
    ];
    for (args, expected) in cases {
        let result = env.run(args);
        assert_eq!(result.code(), 2, "bgw {args:?}: {result:?}");
        assert!(
            result.stderr.contains(expected),
            "bgw {args:?}: stderr lacks {expected:?}: {}",
            result.stderr
        );
    }

    // A value from the configuration file names the file and the key.
    let config = env.data_dir().join("bgw.toml");
    std::fs::write(&config, "[limits]\nmemory_mib = 99999\n").unwrap();
    let result = env.run(&register("--fuel", "1"));
    std::fs::remove_file(&config).unwrap();
    assert_eq!(result.code(), 2, "{result:?}");
    let expected = format!(
        "invalid limits.memory_mib 99999 in config file {}: it must be between 1 and 4096",
        config.display()
    );
    assert!(result.stderr.contains(&expected), "{}", result.stderr);

    // The daemon's keys too, checked by any command that reads the file.
    let daemon_cases = [
        (
            "[daemon]\nconcurrency = 9223372036854775807\n",
            "invalid daemon.concurrency 9223372036854775807",
            "between 1 and 1024",
        ),
        (
            "[daemon]\nvisibility_timeout_secs = 604801\n",
            "invalid daemon.visibility_timeout_secs 604801",
            "between 1 and 604800",
        ),
    ];
    for (text, key, range) in daemon_cases {
        std::fs::write(&config, text).unwrap();
        let result = env.run(&["list"]);
        std::fs::remove_file(&config).unwrap();
        assert_eq!(result.code(), 2, "{text:?}: {result:?}");
        assert!(result.stderr.contains(key), "{text:?}: {}", result.stderr);
        assert!(result.stderr.contains(range), "{text:?}: {}", result.stderr);
    }

    let mut command = env.command(&["list"]);
    let result: support::CommandResult =
        command.env("STORE_MODE", "redis").output().unwrap().into();
    assert_eq!(result.code(), 2, "{result:?}");
    assert!(
        result.stderr.contains("invalid STORE_MODE"),
        "{}",
        result.stderr
    );

    // Every usage error above is found before the store is opened, which on SQLite would
    // create the database file.
    if !env.is_azure() {
        assert!(!env.db_path().exists(), "a usage error opened the store");
    }
}

fn cli_exit_codes_and_lookups(env: TestEnv) {
    env.register("multiply", &guest("multiply"), &[]);
    env.register("hostile", &guest("hostile"), &[]);
    let _daemon = env.start_daemon(&["--concurrency", "2"]);

    let completed = env.run(&[
        "--json",
        "submit",
        "multiply",
        "--resource",
        "res-wait",
        "--payload",
        r#"{"x": 4}"#,
        "--wait",
        "--wait-timeout",
        "60",
    ]);
    assert_eq!(completed.code(), 0, "COMPLETED task: {completed:?}");
    let record: Value = serde_json::from_str(&completed.stdout).expect("--json prints a record");
    assert_completed(&record);
    assert_eq!(output_of(&record), json!({"product": 8}));

    let failed = env.run(&[
        "--json",
        "submit",
        "hostile",
        "--resource",
        "res-wait",
        "--payload",
        r#"{"mode": "trap"}"#,
        "--wait",
        "--wait-timeout",
        "60",
    ]);
    assert_eq!(failed.code(), 3, "ERROR task: {failed:?}");
    let failed_record: Value =
        serde_json::from_str(&failed.stdout).expect("--json prints a record");
    assert_failed_with(&failed_record, "guest trapped");
    let failed_id = failed_record["RowKey"].as_str().unwrap();

    let result = env.run(&["result", failed_id]);
    assert_eq!(
        result.code(),
        3,
        "`bgw result` of an ERROR task: {result:?}"
    );
    assert!(result.stderr.contains("ended ERROR"), "{}", result.stderr);

    let listed = env.run_json(&["list"]);
    let listed = listed
        .as_array()
        .expect("`bgw list --json` prints an array");
    assert_eq!(listed.len(), 2, "{listed:#?}");

    let sleeping = env.submit(
        "hostile",
        r#"{"mode": "sleep", "ms": 5000}"#,
        &["--resource", "res-sleep"],
    );
    let timed_out = env.run(&["wait", &sleeping, "--timeout", "0.3"]);
    assert_eq!(timed_out.code(), 4, "a wait that timed out: {timed_out:?}");
    assert!(
        timed_out.stderr.contains("timed out after 0.3 s"),
        "{}",
        timed_out.stderr
    );
    let submit_timed_out = env.run(&[
        "submit",
        "hostile",
        "--resource",
        "res-sleep",
        "--payload",
        r#"{"mode": "sleep", "ms": 5000}"#,
        "--wait",
        "--wait-timeout",
        "0.3",
    ]);
    assert_eq!(submit_timed_out.code(), 4, "{submit_timed_out:?}");
    assert!(
        submit_timed_out.stderr.contains("timed out after 0.3 s"),
        "{}",
        submit_timed_out.stderr
    );
    assert_task_named_once(&submit_timed_out.stderr);

    let id = record["RowKey"].as_str().unwrap();
    let by_id = env.run_json(&["status", id]);
    assert_eq!(by_id["RowKey"], json!(id), "a task id alone finds the task");
    assert_eq!(by_id["PartitionKey"], json!("res-wait"));
    let by_resource = env.run_json(&["status", id, "--resource", "res-wait"]);
    assert_eq!(by_resource["RowKey"], json!(id));

    for command in ["status", "result", "wait", "cancel"] {
        let wrong_resource = env.run(&[command, id, "--resource", "res-other"]);
        assert_eq!(wrong_resource.code(), 1, "{command}: {wrong_resource:?}");
        let expected = format!("task {id} not found under resource \"res-other\"");
        assert!(
            wrong_resource.stderr.contains(&expected),
            "{command}: {}",
            wrong_resource.stderr
        );
    }

    let unknown = env.run(&["status", "01900000-0000-7000-8000-000000000000"]);
    assert_eq!(unknown.code(), 1, "{unknown:?}");
    assert!(unknown.stderr.contains("not found"), "{}", unknown.stderr);

    let malformed = env.run(&["status", "not-a-task-id"]);
    assert_eq!(malformed.code(), 2, "{malformed:?}");
    assert!(
        malformed.stderr.contains("not a UUID"),
        "{}",
        malformed.stderr
    );
}

/// `bgw result --output-blob` reports the task's status before it looks for a blob, and
/// copies a large blob whole.
fn result_checks_status_before_output_blob(env: TestEnv) {
    env.register("hostile", &guest("hostile"), &["--max-attempts", "1"]);
    env.register("multiply", &guest("multiply"), &[]);
    let _daemon = env.start_daemon(&["--concurrency", "2"]);
    let target = env.data_dir().join("output.bin");
    let result_to_file =
        |task_id: &str| env.run(&["result", task_id, "--output-blob", path_str(&target)]);

    // Several MiB, so the copy takes many reads.
    let size = 3 * 1024 * 1024 + 5;
    let with_blob = env.submit(
        "hostile",
        &format!(r#"{{"mode": "write-output", "bytes": {size}}}"#),
        &[],
    );
    let without_blob = env.submit("multiply", r#"{"x": 4}"#, &[]);
    let failed = env.submit("hostile", r#"{"mode": "trap"}"#, &[]);
    let records = env.wait_all(
        &[with_blob.clone(), without_blob.clone(), failed.clone()],
        TASK_TIMEOUT,
    );
    assert_completed(&records[&with_blob]);
    assert_completed(&records[&without_blob]);
    assert_eq!(status_of(&records[&failed]), "ERROR");

    let saved = result_to_file(&with_blob);
    assert_eq!(saved.code(), 0, "{saved:?}");
    let printed: Value = serde_json::from_str(&saved.stdout).expect("the result is JSON");
    assert_eq!(printed["accepted"], json!(size), "{printed}");
    assert!(
        saved
            .stderr
            .contains(&format!("saved output blob ({size} bytes)")),
        "{}",
        saved.stderr
    );
    let copy = std::fs::read(&target).expect("the output blob was saved");
    assert_eq!(copy.len(), size, "size of the saved blob");
    assert!(copy.iter().all(|&byte| byte == b'x'), "contents");
    std::fs::remove_file(&target).unwrap();

    // A completed task without a blob still prints its result.
    let no_blob = result_to_file(&without_blob);
    assert_eq!(no_blob.code(), 1, "{no_blob:?}");
    let printed: Value = serde_json::from_str(&no_blob.stdout).expect("the result is JSON");
    assert_eq!(printed, json!({"product": 8}));
    assert!(
        no_blob.stderr.contains("has no output blob"),
        "{}",
        no_blob.stderr
    );

    let ended = result_to_file(&failed);
    assert_eq!(ended.code(), 3, "{ended:?}");
    assert!(ended.stderr.contains("ended ERROR"), "{}", ended.stderr);

    let delayed = env.submit("multiply", r#"{"x": 1}"#, &["--delay", "600"]);
    let queued = result_to_file(&delayed);
    assert_eq!(queued.code(), 1, "{queued:?}");
    assert!(
        queued.stderr.contains("has no result yet, it is CREATED"),
        "{}",
        queued.stderr
    );
    env.run_ok(&["cancel", &delayed]);
    let cancelled = result_to_file(&delayed);
    assert_eq!(cancelled.code(), 3, "{cancelled:?}");
    assert!(
        cancelled.stderr.contains("ended CANCELLED"),
        "{}",
        cancelled.stderr
    );

    let sleeping = env.submit("hostile", r#"{"mode": "sleep", "ms": 3000}"#, &[]);
    env.wait_for_status(&sleeping, "RUNNING", TASK_TIMEOUT);
    let running = result_to_file(&sleeping);
    assert_eq!(running.code(), 1, "{running:?}");
    assert!(
        running.stderr.contains("has no result yet, it is RUNNING"),
        "{}",
        running.stderr
    );
    assert!(
        !target.exists(),
        "no file is written for a task without a blob"
    );
}

fn resource_ids_rejected_or_round_trip(env: TestEnv) {
    env.register("multiply", &guest("multiply"), &[]);
    let cases: Value = serde_json::from_slice(&case_file("C04-resource-ids.json")).expect("JSON");
    let resource_ids: Vec<&str> = cases["resource_ids"]
        .as_array()
        .expect("resource_ids array")
        .iter()
        .map(|value| value.as_str().expect("string"))
        .collect();
    let accepted = ["res~0001", "res-\u{640}\u{64b}-0001"];
    for value in accepted {
        assert!(resource_ids.contains(&value), "case file lacks {value:?}");
    }

    for resource_id in resource_ids.iter().filter(|id| !accepted.contains(id)) {
        let result = env.run(&[
            "submit",
            "multiply",
            "--resource",
            resource_id,
            "--payload",
            r#"{"x": 1}"#,
        ]);
        assert_eq!(result.code(), 2, "{resource_id:?}: {result:?}");
        let expected = match first_forbidden_char(resource_id) {
            Some(ch) => format!("(U+{:04X}) at character index", ch as u32),
            None if resource_id.is_empty() => "must not be empty".to_owned(),
            None => "UTF-16 code units".to_owned(),
        };
        assert!(
            result.stderr.contains(&expected),
            "{resource_id:?}: stderr lacks {expected:?}: {}",
            result.stderr
        );
    }
    assert_eq!(
        env.list_json(),
        Vec::<Value>::new(),
        "no rejected id left a task"
    );

    let _daemon = env.start_daemon(&["--concurrency", "2"]);
    let ids: Vec<String> = accepted
        .iter()
        .map(|resource_id| env.submit("multiply", r#"{"x": 3}"#, &["--resource", resource_id]))
        .collect();
    let records = env.wait_all(&ids, TASK_TIMEOUT);
    for (resource_id, id) in accepted.iter().zip(&ids) {
        assert_completed(&records[id]);
        assert_eq!(records[id]["PartitionKey"], json!(resource_id));
        let status = env.run_json(&["status", id, "--resource", resource_id]);
        assert_eq!(
            status["RowKey"],
            json!(id),
            "{resource_id:?}: status by resource id"
        );
        let result = env.run_json(&["result", id, "--resource", resource_id]);
        assert_eq!(
            result,
            json!({"product": 6}),
            "{resource_id:?}: result by resource id"
        );
        let listed = env.run_json(&["list", "--resource", resource_id]);
        let listed_ids: Vec<&Value> = listed
            .as_array()
            .expect("array")
            .iter()
            .map(|r| &r["RowKey"])
            .collect();
        assert_eq!(
            listed_ids,
            [&json!(id)],
            "{resource_id:?}: list by resource id"
        );
    }
}

const PAYLOAD_CASES: [&str; 4] = [
    "C05-payload-45000.json",
    "C05-payload-49500.json",
    "C05-payload-70000.json",
    "C05-payload-multibyte.json",
];

fn large_payloads_reach_guest_intact(env: TestEnv) {
    env.register("echo", &guest("hostile"), &[]);
    let _daemon = env.start_daemon(&["--concurrency", "2"]);

    // The case payloads have no "mode", which the hostile guest needs to echo them, so the
    // submitted payload is the case payload with "mode": "echo" added in front.
    let mut tasks = Vec::new();
    for name in PAYLOAD_CASES {
        let raw = raw_payload_of(&case_file(name));
        let with_mode = format!("{{\"mode\": \"echo\", {}", &raw[1..]);
        let file = write_file(&env, name, with_mode.as_bytes());
        let id = env.submit(
            "echo",
            &format!("@{}", path_str(&file)),
            &["--resource", "res-0005"],
        );
        tasks.push((name, with_mode, id));
    }
    let ids: Vec<String> = tasks.iter().map(|(_, _, id)| id.clone()).collect();
    let records = env.wait_all(&ids, TASK_TIMEOUT);

    for (name, submitted, id) in &tasks {
        let record = &records[id];
        assert_completed(record);
        if azurite_may_corrupt(&env, name) {
            continue;
        }
        let expected: Value = serde_json::from_str(submitted).unwrap();
        let stored: Value = serde_json::from_str(record["InputPayload"].as_str().unwrap()).unwrap();
        assert!(
            stored == expected,
            "{name}: InputPayload differs from the submitted payload"
        );
        assert!(
            output_of(record) == expected,
            "{name}: the guest echoed a different payload"
        );
    }
}

fn large_payloads_stored_byte_for_byte(env: TestEnv) {
    for name in PAYLOAD_CASES {
        let raw = raw_payload_of(&case_file(name));
        let file = write_file(&env, name, raw.as_bytes());
        let id = env.submit(
            "echo",
            &format!("@{}", path_str(&file)),
            &["--resource", "res-0005"],
        );
        let record = env.status_json(&id);
        assert_eq!(status_of(&record), "CREATED", "{name}: {record:#}");
        if azurite_may_corrupt(&env, name) {
            continue;
        }
        let stored = record["InputPayload"].as_str().unwrap_or("");
        assert_eq!(
            stored.len(),
            raw.len(),
            "{name}: InputPayload length differs from the payload file"
        );
        assert!(
            stored == raw,
            "{name}: InputPayload is not byte-identical to the payload file"
        );
    }
}

fn poison_tasks_do_not_block_healthy_task(env: TestEnv) {
    env.register("always-trap", &guest("hostile"), &[]);
    env.register("multiply", &guest("multiply"), &[]);
    let _daemon = env.start_daemon(&["--concurrency", "1", "--missing-component-grace", "1"]);

    // The other messages (malformed JSON, no row_key, a record that does not exist) need
    // direct queue access, so only those that name a task the CLI can create are used.
    let text = String::from_utf8(case_file("C08-poison-messages.jsonl")).expect("UTF-8");
    let messages: Vec<Value> = text
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|message| message.get("row_key").is_some() && message.get("task_type").is_some())
        .filter(|message| message["row_key"] != json!("00000000-0000-4000-8000-00000000dead"))
        .collect();
    let task_types: Vec<&str> = messages
        .iter()
        .map(|m| m["task_type"].as_str().unwrap())
        .collect();
    assert_eq!(
        task_types,
        ["no_such_activity", "always-trap", "multiply"],
        "case messages"
    );

    let mut ids = Vec::new();
    for message in &messages {
        let task_type = message["task_type"].as_str().unwrap();
        // The case leaves the payload empty, but the trapping guest needs its mode.
        let payload = match task_type {
            "always-trap" => json!({"mode": "trap"}),
            _ => message["payload"].clone(),
        };
        let resource_id = message["resource_id"].as_str().unwrap();
        ids.push(env.submit(
            task_type,
            &payload.to_string(),
            &["--resource", resource_id],
        ));
    }
    let records = env.wait_all(&ids, TASK_TIMEOUT);

    let unknown = &records[&ids[0]];
    assert_failed_with(unknown, "no component registered");
    assert!(
        error_of(unknown).contains("\"no_such_activity\""),
        "names the type: {unknown:#}"
    );
    let trapped = &records[&ids[1]];
    assert_failed_with(trapped, "guest trapped");
    assert_eq!(
        trapped["Attempt"],
        json!(3),
        "a trap is retried up to the default of 3 attempts: {trapped:#}"
    );
    assert_eq!(
        trapped["AttemptHistory"].as_array().map(Vec::len),
        Some(3),
        "each attempt is in the history: {trapped:#}"
    );
    let healthy = &records[&ids[2]];
    assert_completed(healthy);
    assert_eq!(output_of(healthy), json!({"product": 4}));

    // The task without a component is dead-lettered once its grace period is over, and
    // the trapping task once its attempts are used up, with its last error.
    let dead_letters = env.run_json(&["dead-letters"]);
    let letters = dead_letters.as_array().expect("an array");
    assert_eq!(letters.len(), 2, "{dead_letters:#}");
    let reason_for = |id: &str| -> &str {
        letters
            .iter()
            .find(|letter| letter["RowKey"] == id)
            .and_then(|letter| letter["Reason"].as_str())
            .unwrap_or_else(|| panic!("no dead letter for task {id}: {dead_letters:#}"))
    };
    assert!(
        reason_for(&ids[0]).contains("no component registered"),
        "{dead_letters:#}"
    );
    let trap_reason = reason_for(&ids[1]);
    assert!(
        trap_reason.contains("attempt 3 of 3 failed and no attempts are left"),
        "{dead_letters:#}"
    );
    assert!(trap_reason.contains("guest trapped"), "{dead_letters:#}");
}

/// Checks that a task whose delay is longer than the missing-component grace still waits
/// the whole grace once it is visible, because the grace counts from the first look at it.
/// A task queued while no daemon ran is in the same case.
fn delayed_task_gets_whole_component_grace(env: TestEnv) {
    let _daemon = env.start_daemon(&["--concurrency", "1", "--missing-component-grace", "3"]);
    let id = env.submit("not-yet", "{}", &["--delay", "2"]);
    let record = env.wait_one(&id, TASK_TIMEOUT);
    assert_failed_with(
        &record,
        "no component registered for activity type \"not-yet\" within 3 s",
    );
    assert_eq!(
        record["ComponentWaitStart"],
        Value::Null,
        "the ended wait leaves no start: {record:#}"
    );

    let visible = time_of(&record, "CreatedTime") + chrono::TimeDelta::seconds(2);
    let waited = (time_of(&record, "EndTime") - visible)
        .to_std()
        .unwrap_or_default();
    // Azure's lease times are whole seconds, which can shorten the counted wait by up to
    // 1 s. Counted from the submit, the 2 s delay used up most of the grace, and the task
    // failed at its first look.
    assert!(
        waited >= Duration::from_secs(2),
        "the task waited {waited:?} after it became visible: {record:#}"
    );
}

fn task_waits_for_late_registration(env: TestEnv) {
    let daemon = env.start_daemon_with_env(
        &["--concurrency", "1", "--missing-component-grace", "30"],
        &[("RUST_LOG", "info,bgw::daemon=debug")],
    );
    let early = env.submit("late-type", r#"{"x": 4}"#, &[]);
    let retrying = env.submit("late-retryable", r#"{"mode": "retryable"}"#, &[]);
    // The record is CREATED from the submit on, so wait for the daemon's note on it.
    let waiting = env.wait_for("the record to say it waits", TASK_TIMEOUT, || {
        let record = env.status_json(&early);
        error_of(&record)
            .contains("waiting up to")
            .then_some(record)
    });
    assert_eq!(status_of(&waiting), "CREATED", "{waiting:#}");
    assert!(
        error_of(&waiting).contains("waiting up to 30 s"),
        "the record names the grace period: {waiting:#}"
    );

    // Let the daemon look at each task again before the registration: a look is not an attempt.
    let log_lines = |id: &str, text: &str| -> usize {
        let log = daemon.log();
        log.lines()
            .filter(|line| line.contains(id) && line.contains(text))
            .count()
    };
    env.wait_for("a second look at each task", TASK_TIMEOUT, || {
        let looked_again = [&early, &retrying]
            .iter()
            .all(|id| log_lines(id, "task still waits for a component") > 0);
        looked_again.then_some(())
    });
    let waiting = env.status_json(&early);
    assert_eq!(waiting["Attempt"], 0, "no attempt ran: {waiting:#}");
    assert_eq!(
        waiting["AttemptHistory"].as_array().map_or(0, Vec::len),
        0,
        "waiting leaves no history entry: {waiting:#}"
    );

    env.register("late-type", &guest("multiply"), &[]);
    env.register(
        "late-retryable",
        &guest("hostile"),
        &["--max-attempts", "3", "--backoff", "0.05"],
    );
    let records = env.wait_all(&[early.clone(), retrying.clone()], TASK_TIMEOUT);

    let record = &records[&early];
    assert_completed(record);
    assert_eq!(output_of(record), json!({"product": 8}));
    assert_eq!(record["Attempt"], 1, "one attempt ran: {record:#}");
    assert_eq!(
        record["AttemptHistory"].as_array().map(Vec::len),
        Some(1),
        "one history entry: {record:#}"
    );

    // The waits used none of the three attempts of the retry policy.
    let record = &records[&retrying];
    assert_failed_with(record, "retryable error");
    assert_eq!(record["Attempt"], 3, "three attempts ran: {record:#}");
    let history = record["AttemptHistory"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(history.len(), 3, "one entry per attempt: {record:#}");
    for (index, entry) in history.iter().enumerate() {
        assert_eq!(
            entry["Attempt"],
            index + 1,
            "attempt numbers count up: {record:#}"
        );
        assert!(
            entry["ErrorMessage"]
                .as_str()
                .unwrap_or("")
                .contains("retryable error"),
            "each entry is a run of the guest: {record:#}"
        );
    }

    // The first look logs at info level and the later ones at debug level.
    let log = daemon.log();
    for id in [&early, &retrying] {
        let lines_of = |text: &str| -> Vec<&str> {
            log.lines()
                .filter(|line| line.contains(id.as_str()) && line.contains(text))
                .collect()
        };
        let first = lines_of("task waits for a component");
        assert_eq!(
            first.len(),
            1,
            "one line for the first look at {id}: {first:#?}"
        );
        assert!(first[0].contains(" INFO "), "{first:#?}");
        let later = lines_of("task still waits for a component");
        assert!(
            !later.is_empty(),
            "no later look at {id}{}",
            daemon.log_tail()
        );
        assert!(
            later.iter().all(|line| line.contains("DEBUG")),
            "{later:#?}"
        );
    }

    // Only the task whose attempts are used up is dead-lettered.
    let letters = env.dead_letters_json();
    assert_eq!(letters.len(), 1, "{letters:#?}");
    assert_eq!(letters[0]["RowKey"], retrying.as_str(), "{letters:#?}");
    assert!(
        letters[0]["Reason"]
            .as_str()
            .unwrap_or("")
            .contains("attempt 3 of 3 failed and no attempts are left: retryable error"),
        "{letters:#?}"
    );
}

fn fuel_and_deadline_stop_endless_guests(env: TestEnv) {
    const SPIN_FUEL: u64 = 50_000_000;
    const BURN_FUEL: u64 = 2_000_000_000;
    const TRAP_FUEL: u64 = 100_000_000_000;
    /// The countdown of burn-then-trap runs 2^31 - 1 iterations before it traps.
    const COUNTDOWN: u64 = (1 << 31) - 1;

    let hostile = guest("hostile");
    env.register("spin", &hostile, &["--fuel", &SPIN_FUEL.to_string()]);
    env.register(
        "burn_then_trap",
        &hostile,
        &["--fuel", &BURN_FUEL.to_string()],
    );
    env.register(
        "burn_to_trap",
        &hostile,
        &["--fuel", &TRAP_FUEL.to_string(), "--timeout", "60"],
    );
    env.register("sleep_in_host", &hostile, &["--timeout", "1"]);
    env.register("multiply", &guest("multiply"), &[]);
    let mut daemon = env.start_daemon(&["--concurrency", "2"]);

    let spin = r#"{"mode": "spin"}"#;
    let burn = r#"{"mode": "burn-then-trap"}"#;
    let sleep = r#"{"mode": "sleep", "ms": 60000}"#;
    let mut hostile_ids: Vec<(&str, String)> = Vec::new();
    let mut multiply_ids = Vec::new();
    for round in 0..3 {
        hostile_ids.push(("spin", env.submit("spin", spin, &[])));
        hostile_ids.push(("burn_then_trap", env.submit("burn_then_trap", burn, &[])));
        hostile_ids.push(("sleep_in_host", env.submit("sleep_in_host", sleep, &[])));
        for x in [3 * round, 3 * round + 1, 3 * round + 2] {
            multiply_ids.push((env.submit("multiply", &json!({"x": x}).to_string(), &[]), x));
        }
    }
    multiply_ids.push((env.submit("multiply", r#"{"x": 9}"#, &[]), 9));
    // One countdown with fuel to spare shows that fuel burned before a trap is charged.
    hostile_ids.push(("burn_to_trap", env.submit("burn_to_trap", burn, &[])));

    let mut all: Vec<String> = hostile_ids.iter().map(|(_, id)| id.clone()).collect();
    all.extend(multiply_ids.iter().map(|(id, _)| id.clone()));
    let records = env.wait_all(&all, TASK_TIMEOUT);

    for (activity_type, id) in &hostile_ids {
        let record = &records[id];
        let fuel = fuel_of(record);
        match *activity_type {
            "spin" => {
                assert_failed_with(record, "fuel limit exceeded");
                assert_eq!(fuel, SPIN_FUEL, "spin is charged its whole budget");
            }
            "burn_then_trap" => {
                assert_failed_with(record, "fuel limit exceeded");
                assert_eq!(fuel, BURN_FUEL, "the countdown is charged its whole budget");
            }
            "sleep_in_host" => {
                assert_failed_with(record, "deadline exceeded");
                let took = run_time(record);
                assert!(
                    took < Duration::from_secs(10),
                    "sleep was cut off after {took:?}"
                );
            }
            _ => {
                assert_failed_with(record, "guest trapped");
                assert!(
                    fuel > COUNTDOWN,
                    "fuel burned before the trap is charged: {fuel}"
                );
                assert!(
                    fuel < TRAP_FUEL,
                    "the trap ended the attempt before the budget: {fuel}"
                );
            }
        }
    }
    assert_eq!(multiply_ids.len(), 10);
    for (id, x) in &multiply_ids {
        assert_completed(&records[id]);
        assert_eq!(
            output_of(&records[id]),
            json!({"product": 2 * x}),
            "task {id}"
        );
    }
    assert!(
        daemon.is_alive(),
        "the daemon survives{}",
        daemon.log_tail()
    );
}

fn deep_recursion_fails_next_task_runs(env: TestEnv) {
    env.register("deep", &guest("hostile"), &[]);
    env.register("multiply", &guest("multiply"), &[]);
    let mut daemon = env.start_daemon(&["--concurrency", "1"]);

    let deep = env.submit("deep", r#"{"mode": "recurse", "depth": 1000000}"#, &[]);
    let deep_then_host = env.submit(
        "deep",
        r#"{"mode": "recurse-then-log", "depth": 1000000}"#,
        &[],
    );
    let next = env.submit("multiply", r#"{"x": 50}"#, &[]);
    let records = env.wait_all(
        &[deep.clone(), deep_then_host.clone(), next.clone()],
        TASK_TIMEOUT,
    );

    assert_failed_with(&records[&deep], "stack overflow");
    assert_failed_with(&records[&deep_then_host], "stack overflow");
    assert_completed(&records[&next]);
    assert_eq!(output_of(&records[&next]), json!({"product": 100}));
    assert!(
        daemon.is_alive(),
        "the daemon survives stack overflows{}",
        daemon.log_tail()
    );
}

fn prune_deletes_old_finished_tasks(env: TestEnv) {
    env.register("word-count", &guest("word-count"), &[]);
    env.register("echo", &guest("hostile"), &[]);
    let _daemon = env.start_daemon(&["--concurrency", "2"]);
    let text = write_file(&env, "words.txt", b"one two two\n");
    let id = env.submit("word-count", "{}", &["--blob", path_str(&text)]);
    // A payload, and so a result, too long for a table property and a queue message: on
    // Azure each is stored as a blob in bgw-payloads.
    let raw = raw_payload_of(&case_file("C05-payload-70000.json"));
    let large = write_file(
        &env,
        "large.json",
        format!("{{\"mode\": \"echo\", {}", &raw[1..]).as_bytes(),
    );
    let large_id = env.submit("echo", &format!("@{}", path_str(&large)), &[]);
    let records = env.wait_all(&[id.clone(), large_id.clone()], TASK_TIMEOUT);
    assert_completed(&records[&id]);
    assert_completed(&records[&large_id]);

    let backend = env.backend();
    let exists = |container: &str, name: String| {
        let blob = bgw::backend::BlobRef {
            container: container.to_owned(),
            name,
        };
        match backend.blobs().open(&blob) {
            Ok(_) => true,
            Err(bgw::Error::NotFound(_)) => false,
            Err(error) => panic!("failed to open blob {container}/{}: {error}", blob.name),
        }
    };
    let input_exists = || exists("bgw-input", format!("{id}/input"));
    let output_exists = || exists("bgw-output", format!("{id}/output"));
    let payload_blobs = || match env.is_azure() {
        true => env.azure_blob_names("bgw-payloads", &format!("{large_id}/")),
        false => Vec::new(),
    };
    assert!(input_exists(), "the input blob exists");
    assert!(output_exists(), "the output blob exists");
    if env.is_azure() {
        let names = payload_blobs();
        for kind in ["InputPayload-", "OutputPayload-", "message-payload-"] {
            assert!(
                names.iter().any(|name| name.contains(kind)),
                "no {kind} blob of the large task in bgw-payloads: {names:?}"
            );
        }
    }

    let kept = env.run_ok(&["prune", "--older-than", "1"]);
    assert!(kept.contains("pruned 0 finished tasks"), "{kept}");
    assert_eq!(env.list_json().len(), 2, "recent tasks are kept");
    assert!(input_exists(), "a kept task keeps its input blob");

    let pruned = env.run_ok(&["prune", "--older-than", "0"]);
    assert!(pruned.contains("pruned 2 finished tasks"), "{pruned}");
    assert!(env.list_json().is_empty(), "the task records are gone");
    assert!(!input_exists(), "the input blob is gone");
    assert!(!output_exists(), "the output blob is gone");
    assert_eq!(
        payload_blobs(),
        Vec::<String>::new(),
        "the payload and result blobs are gone"
    );

    let usage = env.run(&["prune", "--older-than", "-1"]);
    assert_eq!(usage.code(), 2, "a negative age is bad usage");

    // The cutoff has the six fractional digits of the times `bgw` writes. A cutoff taken
    // from the nanosecond clock shows a seventh digit in nine runs of ten.
    let outputs = (0..5).map(|_| env.run_ok(&["prune", "--older-than", "36500"]));
    for output in [kept, pruned].into_iter().chain(outputs) {
        let cutoff = output
            .trim()
            .rsplit(' ')
            .next()
            .expect("prune prints its cutoff last");
        let fraction = cutoff
            .strip_suffix('Z')
            .and_then(|time| time.rsplit_once('.'))
            .map(|(_, fraction)| fraction)
            .unwrap_or_else(|| panic!("cutoff {cutoff:?} has no fraction: {output}"));
        assert_eq!(fraction.len(), 6, "cutoff {cutoff:?}: {output}");
    }
}

fn times_are_utc_across_time_zones(env: TestEnv) {
    env.register("multiply", &guest("multiply"), &[]);
    let _utc = env.start_daemon_with_env(&["--concurrency", "2"], &[("TZ", "UTC")]);
    let _pacific =
        env.start_daemon_with_env(&["--concurrency", "2"], &[("TZ", "America/Los_Angeles")]);

    let submitted = env
        .command(&[
            "submit",
            "multiply",
            "--resource",
            "res-tz",
            "--payload",
            r#"{"x": 3}"#,
            "--count",
            "40",
        ])
        .env("TZ", "Asia/Kolkata")
        .output()
        .expect("failed to run `bgw submit`");
    assert!(submitted.status.success(), "{submitted:?}");
    let ids: Vec<String> = String::from_utf8_lossy(&submitted.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(ids.len(), 40);
    let records = env.wait_all(&ids, TASK_TIMEOUT);

    for (id, record) in &records {
        assert_completed(record);
        let times: Vec<chrono::DateTime<chrono::FixedOffset>> =
            ["CreatedTime", "StartTime", "EndTime"]
                .iter()
                .map(|field| {
                    let text = record[field].as_str().unwrap_or_default();
                    assert!(text.ends_with('Z'), "{id}: {field} is UTC with Z: {text:?}");
                    // Six fractional digits, as background-workflows reads them.
                    let fraction = text.split_once('.').map_or("", |(_, fraction)| fraction);
                    assert_eq!(fraction.len(), 7, "{id}: {field} has 6 digits: {text:?}");
                    chrono::DateTime::parse_from_rfc3339(text)
                        .unwrap_or_else(|error| panic!("{id}: {field} {text:?}: {error}"))
                })
                .collect();
        assert!(
            times[1] >= times[0],
            "{id}: started after it was created: {record:#}"
        );
        assert!(
            times[2] >= times[1],
            "{id}: ended after it started: {record:#}"
        );
    }
}

/// Registers a component, runs the daemon and starts and waits for a task, all through
/// the library in this process. Only the `bgw` binary may install a global `tracing`
/// subscriber or set the `log` crate's level, because an application that embeds the
/// library decides how it logs.
fn library_leaves_logging_alone(env: TestEnv) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("failed to build a tokio runtime");
    let backend = env.backend();
    // Few pooled instances, because every test of this binary shares its address space.
    let settings = bgw::sandbox::EngineSettings {
        pooled_instances: 4,
        ..bgw::sandbox::EngineSettings::default()
    };
    let sandbox = bgw::sandbox::Sandbox::new(settings).expect("failed to create the sandbox");
    let wasm = support::guest_bytes("multiply");
    runtime
        .block_on(bgw::registry::register(
            backend.registry(),
            &sandbox,
            "multiply",
            &wasm,
            bgw::config::DEFAULT_LIMITS,
        ))
        .expect("failed to register multiply through the library");

    let client = bgw::client::WorkflowClient::new(backend.clone(), path_str(&env.db_path()));
    let options = bgw::daemon::DaemonOptions {
        concurrency: 1,
        ..bgw::daemon::DaemonOptions::default()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let record = runtime.block_on(async {
        let daemon = tokio::spawn(bgw::daemon::run(backend.clone(), sandbox, options, async {
            let _ = stopped.await;
        }));
        let task_id = client
            .start_activity("multiply", "res-logging", br#"{"x": 4}"#, None)
            .await
            .expect("failed to start a task through the library");
        let record = client
            .wait(&task_id, None, Some(TASK_TIMEOUT))
            .await
            .expect("failed to wait for the task");
        let _ = stop.send(());
        daemon
            .await
            .expect("the daemon task panicked")
            .expect("the daemon failed");
        record
    });
    assert_eq!(
        record.status,
        bgw::record::Status::Completed,
        "the library ran the task: {record:?}"
    );
    let result: Value =
        serde_json::from_str(&record.output_payload).expect("the stored result is JSON");
    assert_eq!(
        result,
        json!({"product": 8}),
        "the library stored the result"
    );

    assert!(
        !tracing::dispatcher::has_been_set(),
        "the library installed a global tracing subscriber"
    );
    assert_eq!(
        log::max_level(),
        log::LevelFilter::Off,
        "the library changed the log crate's max level, which installing a logger does"
    );
}

#[test]
fn bulk_submit_tasks_all_complete() {
    let env = TestEnv::new();
    env.register("multiply", &guest("multiply"), &[]);
    let _daemon = env.start_daemon(&["--concurrency", "2"]);

    // More tasks than one `start_activities` call of the CLI takes, so the ids of several
    // calls must come back in order.
    let repeated = env.submit_many("multiply", r#"{"x": 4}"#, &["--count", "2100"]);
    let lines: Vec<String> = (0..1_100).map(|x| json!({"x": x}).to_string()).collect();
    let payloads = env.data_dir().join("payloads.jsonl");
    std::fs::write(&payloads, lines.join("\n")).unwrap();
    let from_file = env.run_ok(&[
        "submit",
        "multiply",
        "--resource",
        support::DEFAULT_RESOURCE,
        "--payloads",
        path_str(&payloads),
    ]);
    let from_file: Vec<String> = from_file.lines().map(str::to_owned).collect();

    assert_eq!(repeated.len(), 2_100);
    assert_eq!(from_file.len(), 1_100);
    let mut all = repeated.clone();
    all.extend(from_file.iter().cloned());
    let distinct: HashSet<&String> = all.iter().collect();
    assert_eq!(distinct.len(), all.len(), "every task has its own id");
    let records = env.wait_all(&all, Duration::from_secs(120));
    for id in &repeated {
        assert_completed(&records[id]);
        assert_eq!(output_of(&records[id]), json!({"product": 8}), "task {id}");
    }
    for (x, id) in from_file.iter().enumerate() {
        assert_completed(&records[id]);
        assert_eq!(
            output_of(&records[id]),
            json!({"product": 2 * x}),
            "task {id} on line {}",
            x + 1
        );
    }
}

#[test]
fn bulk_submit_wait_prints_each_task() {
    let env = TestEnv::new();
    env.register("multiply", &guest("multiply"), &[]);
    let _daemon = env.start_daemon(&["--concurrency", "2"]);

    let printed = env.run_ok(&[
        "submit",
        "multiply",
        "--resource",
        support::DEFAULT_RESOURCE,
        "--payload",
        r#"{"x": 5}"#,
        "--count",
        "3",
        "--wait",
    ]);

    let lines: Vec<&str> = printed.lines().collect();
    assert_eq!(lines.len(), 4, "three tasks and a summary: {printed}");
    assert_eq!(lines[3], "COMPLETED: 3", "{printed}");
    for line in &lines[..3] {
        let (task_id, status) = line.split_once("  ").expect("an id and a status");
        assert_eq!(status, "COMPLETED", "{printed}");
        assert_completed(&env.status_json(task_id));
    }

    // An unknown type never runs, so the wait times out and says how many are left.
    let timed_out = env.run(&[
        "submit",
        "no-such-type",
        "--resource",
        support::DEFAULT_RESOURCE,
        "--payload",
        "{}",
        "--count",
        "2",
        "--wait",
        "--wait-timeout",
        "0.2",
    ]);
    assert_eq!(timed_out.code(), 4, "{timed_out:?}");
    assert!(
        timed_out
            .stderr
            .contains("2 of 2 started tasks not seen finished"),
        "{}",
        timed_out.stderr
    );
    assert_task_named_once(&timed_out.stderr);
}

/// `submit --count N --wait --wait-timeout T` gives up T seconds after it starts waiting,
/// not T seconds per task. With one worker, three tasks of 1.5 s each end at about 1.5,
/// 3 and 4.5 s. A timeout of 2.5 s per task would see all three finish; one timeout for
/// all of them ends while the second still runs.
#[test]
fn bulk_wait_timeout_counts_once_for_all_tasks() {
    let env = TestEnv::new();
    env.register("hostile", &guest("hostile"), &[]);
    let _daemon = env.start_daemon(&["--concurrency", "1"]);

    let started = Instant::now();
    let timed_out = env.run(&[
        "submit",
        "hostile",
        "--resource",
        support::DEFAULT_RESOURCE,
        "--payload",
        r#"{"mode": "sleep", "ms": 1500}"#,
        "--count",
        "3",
        "--wait",
        "--wait-timeout",
        "2.5",
    ]);
    let waited = started.elapsed();
    assert_eq!(timed_out.code(), 4, "{timed_out:?}");
    assert!(
        timed_out
            .stderr
            .contains("of 3 started tasks not seen finished within the --wait-timeout of 2.5 s"),
        "{}",
        timed_out.stderr
    );
    assert!(
        waited < Duration::from_millis(4_000),
        "the command returned after {waited:?}, not near 2.5 s"
    );
    let (_, after) = timed_out
        .stderr
        .split_once("timed out after ")
        .expect("the error says how long the last wait took");
    let seconds = after.split(' ').next().unwrap_or_default();
    let decimals = seconds
        .split_once('.')
        .map_or(0, |(_, fraction)| fraction.len());
    assert!(
        decimals <= 3,
        "the time is rounded to milliseconds: {}",
        timed_out.stderr
    );
}

/// Asserts that an error of `submit --wait-timeout` names the task it waited for once.
fn assert_task_named_once(stderr: &str) {
    let (_, after) = stderr
        .split_once("waiting for task ")
        .unwrap_or_else(|| panic!("the error names no task: {stderr}"));
    let task_id = &after[..36];
    assert_eq!(stderr.matches(task_id).count(), 1, "{stderr}");
}

/// A database file that exists but has no tables of `bgw`: empty, or made by SQLite with
/// nothing in it. The first submit must create the tables and store the task, not skip the
/// schema and return an id for a task that was never stored.
#[test]
fn first_submit_creates_tables_in_empty_file() {
    type Prepare = fn(&Path);
    let cases: [(&str, Prepare); 2] = [
        ("an empty file", |path| {
            std::fs::File::create(path).expect("failed to create an empty file");
        }),
        ("a database without tables", |path| {
            let connection = rusqlite::Connection::open(path).expect("failed to create a database");
            connection
                .execute_batch("CREATE TABLE scratch (x); DROP TABLE scratch;")
                .expect("failed to write the database header");
        }),
    ];

    for (case, prepare) in cases {
        let env = TestEnv::new();
        prepare(&env.db_path());
        let tables = rusqlite::Connection::open(env.db_path())
            .and_then(|connection| {
                connection.query_row("SELECT count(*) FROM sqlite_master", [], |row| {
                    row.get::<_, i64>(0)
                })
            })
            .unwrap_or_else(|error| panic!("{case}: failed to read the schema: {error}"));
        assert_eq!(tables, 0, "{case}: the file starts without tables");

        let client = bgw::client::WorkflowClient::new(env.backend(), path_str(&env.db_path()));
        let runtime = support::runtime();
        let task_id = runtime
            .block_on(client.start_activity("multiply", "res-empty", br#"{"x": 4}"#, None))
            .unwrap_or_else(|error| panic!("{case}: the first submit failed: {error:#}"));
        let status = runtime
            .block_on(client.get_status(&task_id, None))
            .unwrap_or_else(|error| panic!("{case}: failed to read task {task_id}: {error:#}"));
        assert_eq!(
            status,
            Some(bgw::record::Status::Created),
            "{case}: the submit stored the record"
        );
        assert_eq!(
            env.queue_length(),
            1,
            "{case}: the submit enqueued one message"
        );

        env.register("multiply", &guest("multiply"), &[]);
        let _daemon = env.start_daemon(&["--concurrency", "1"]);
        let record = env.wait_one(&task_id, TASK_TIMEOUT);
        assert_completed(&record);
        assert_eq!(
            output_of(&record),
            json!({"product": 8}),
            "{case}: task {task_id}"
        );
    }
}

#[test]
fn config_db_path_follows_data_dir() {
    let env = TestEnv::new();
    std::fs::write(
        env.data_dir().join("bgw.toml"),
        "sqlite_db_path = \"relative.db\"\n",
    )
    .unwrap();
    let elsewhere = tempfile::tempdir().unwrap();

    let mut submit = env.command(&["submit", "multiply", "--resource", "res-1"]);
    let submitted: support::CommandResult = submit
        .current_dir(elsewhere.path())
        .output()
        .expect("failed to start the bgw binary")
        .into();
    assert_eq!(submitted.code(), 0, "{submitted:?}");

    assert!(
        env.data_dir().join("relative.db").is_file(),
        "the database is in the data directory"
    );
    assert!(
        !elsewhere.path().join("relative.db").exists(),
        "no database in the current directory"
    );
    assert_eq!(
        env.list_json().len(),
        1,
        "a command run elsewhere sees the task"
    );
}

/// Returns a `bgw submit` of a `multiply` task whose input blob it reads from a piped
/// stdin.
fn stdin_blob_submit(env: &TestEnv) -> std::process::Command {
    let mut command = env.command(&[
        "submit",
        "multiply",
        "--resource",
        "r",
        "--blob",
        "/dev/stdin",
    ]);
    command.stdin(std::process::Stdio::piped());
    command
}

/// A submit stopped by SIGINT while it copies its blob leaves a partial blob file, which
/// the next `bgw` command deletes once the file is an hour old.
#[test]
fn interrupted_submit_leaves_file_for_cleanup() {
    use std::io::Write;

    let env = TestEnv::new();
    let temp_dir = env.data_dir().join("blobs/.tmp");
    let mut child = stdin_blob_submit(&env)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("failed to start the bgw binary");
    // The pipe stays open, so the copy waits for more data until the signal.
    let mut stdin = child.stdin.take().expect("stdin is piped");
    stdin.write_all(&[b'z'; 100_000]).unwrap();
    let part_file = env.wait_for("the partial blob file", TASK_TIMEOUT, || {
        let path = std::fs::read_dir(&temp_dir).ok()?.next()?.ok()?.path();
        let size = std::fs::metadata(&path).ok()?.len();
        (size == 100_000).then_some(path)
    });
    // SAFETY: kill only sends a signal to the child this test started.
    let sent = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    assert_eq!(sent, 0, "failed to send SIGINT");
    let status = child.wait().expect("failed to wait for bgw");
    assert!(!status.success(), "the submit was stopped: {status:?}");
    drop(stdin);
    assert!(
        part_file.exists(),
        "the stopped submit left its partial blob"
    );
    assert!(
        env.list_json().is_empty(),
        "the stopped submit started no task"
    );

    // A file changed within the hour may still be written, so it stays.
    env.run_ok(&["list"]);
    assert!(part_file.exists(), "a recent partial blob is kept");

    let file = std::fs::File::options()
        .write(true)
        .open(&part_file)
        .unwrap();
    file.set_modified(std::time::SystemTime::now() - Duration::from_secs(2 * 3600))
        .unwrap();
    drop(file);
    env.run_ok(&["list"]);
    assert!(!part_file.exists(), "an hour-old partial blob is deleted");
}

#[test]
fn closed_stdout_ends_commands_quietly() {
    let env = TestEnv::new();
    env.register("multiply", &guest("multiply"), &[]);
    let ids = env.submit_many("multiply", r#"{"x": 1}"#, &["--count", "1000"]);

    // A reader that takes the first lines of a long output and then closes, as `head` does.
    let mut list = env.command(&["--json", "list", "--limit", "1000"]);
    let mut child = list
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("failed to start the bgw binary");
    let mut reader = std::io::BufReader::new(child.stdout.take().unwrap());
    for _ in 0..5 {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
        assert!(
            !line.is_empty(),
            "`bgw --json list` printed fewer than 5 lines"
        );
    }
    drop(reader);
    let listed: support::CommandResult = child.wait_with_output().unwrap().into();
    assert_eq!(listed.code(), 0, "{listed:?}");
    assert_eq!(listed.stderr, "", "no message after the reader closed");

    // Every command, with a pipe whose reader closed before the command wrote anything.
    let commands: [&[&str]; 7] = [
        &["list"],
        &["--json", "list"],
        &["status", &ids[0]],
        &["--json", "status", &ids[0]],
        &["activities"],
        &["--json", "activities"],
        &["submit", "multiply", "--resource", "res-1"],
    ];
    for args in commands {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let mut command = env.command(args);
        let result: support::CommandResult = command.stdout(writer).output().unwrap().into();
        assert_eq!(result.code(), 0, "bgw {args:?}: {result:?}");
        assert_eq!(result.stderr, "", "bgw {args:?}: no message");
    }
}

#[test]
fn activities_json_matches_table() {
    let env = TestEnv::new();
    env.register("multiply", &guest("multiply"), &[]);
    let second = env.register("multiply", &rebuilt_guest(&env, "multiply", "2"), &[]);
    env.register("echo", &guest("hostile"), &["--max-output", "3072"]);

    // Without a type: the current version of each type, in both formats.
    let current = env.run_json(&["activities"]);
    let current = current.as_array().expect("an array of versions");
    let listed: Vec<(&str, u64)> = current
        .iter()
        .map(|version| {
            let activity_type = version["activity_type"].as_str().unwrap();
            (activity_type, version["version"].as_u64().unwrap())
        })
        .collect();
    assert_eq!(listed, [("multiply", 2), ("echo", 1)], "{current:#?}");
    assert_eq!(current[0]["digest"], second["digest"]);
    let table = env.run_ok(&["activities"]);
    assert_eq!(table.lines().count(), 1 + current.len(), "{table}");
    // Sizes are in MiB or KiB, like memory.
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[1].contains(" 256 MiB "), "{table}");
    assert!(lines[2].contains(" 3 KiB "), "{table}");

    // With a type: its whole history.
    let history = env.run_json(&["activities", "multiply"]);
    assert_eq!(history.as_array().map(Vec::len), Some(2), "{history:#}");
    let table = env.run_ok(&["activities", "multiply"]);
    assert_eq!(table.lines().count(), 3, "{table}");
}

#[test]
fn error_cause_printed_once() {
    let env = TestEnv::new();
    // A directory where the configuration file should be: an I/O error of the library.
    std::fs::create_dir(env.data_dir().join("bgw.toml")).unwrap();

    let result = env.run(&["list"]);
    assert_eq!(result.code(), 1, "{result:?}");
    let cause = "Is a directory (os error 21)";
    assert_eq!(result.stderr.matches(cause).count(), 1, "{}", result.stderr);
    assert!(
        result
            .stderr
            .starts_with("error: failed to read config file "),
        "{}",
        result.stderr
    );
}

//! Crash tests: daemons killed with SIGKILL while tasks run, and a task whose worker dies
//! on every delivery. Each runs as `sqlite::NAME` and as `azure::NAME` on Azurite. The
//! final state is read from the task tables and the queue themselves, so a task lost
//! between the tables and the queue cannot hide.

mod support;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use bgw::backend::ListFilter;
use bgw::record::Status;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use support::{guest, output_of, path_str, runtime, test_seed, TaskTable, TestEnv};

support::on_both_backends!(
    sigkill_loses_no_task,
    crash_loop_dead_letters_after_five_deliveries,
    paused_worker_cannot_overwrite_new_owner,
);

/// Tasks of the kill test that return at once, on SQLite and on Azure. Each task costs
/// several HTTP requests to Azurite, so the Azure run is smaller.
const MULTIPLY_TASKS: [usize; 2] = [1_800, 360];

/// Tasks of the kill test that sleep 20 to 80 ms, so that attempts are running when the
/// daemon is killed, on SQLite and on Azure.
const SLEEP_TASKS: [usize; 2] = [200, 40];

/// Submits of the kill test. Each adds a share of both kinds, so sleeping tasks are spread
/// over the whole queue.
const SUBMIT_ROUNDS: usize = 10;

/// Arguments of every daemon of the kill test. The short visibility timeout makes the
/// attempts of a killed daemon visible again after 2 s.
const KILL_TEST_DAEMON: [&str; 4] = ["--concurrency", "4", "--visibility-timeout", "2"];

/// Maximum time for all tasks of the kill test to finish after the last restart.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(90);

/// Time a freshly started daemon gets to mark a task RUNNING.
const RUNNING_TIMEOUT: Duration = Duration::from_secs(20);

/// Deliveries after which the daemon dead-letters a message, `DEFAULT_MAX_DELIVERIES`.
const MAX_DELIVERIES: u64 = 5;

/// Counts the RUNNING records whose attempt the daemon with this process id started.
/// Host ids are `HOSTNAME:PID`.
fn running_on(backend: &dyn bgw::backend::Backend, pid: u32) -> usize {
    let filter = ListFilter {
        status: Some(Status::Running),
        ..ListFilter::default()
    };
    let records = runtime()
        .block_on(backend.list_tasks(&filter))
        .expect("failed to list the RUNNING tasks");
    let suffix = format!(":{pid}");
    records
        .iter()
        .filter(|record| {
            record
                .host_id
                .as_deref()
                .is_some_and(|id| id.ends_with(&suffix))
        })
        .count()
}

/// Returns the number of rows and of distinct task ids in a task table.
fn rows_and_ids(env: &TestEnv, table: TaskTable) -> (usize, usize) {
    let keys = env.row_keys(table);
    let distinct: HashSet<&String> = keys.iter().collect();
    (keys.len(), distinct.len())
}

fn sigkill_loses_no_task(env: TestEnv) {
    let seed = test_seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let backend_index = usize::from(env.is_azure());
    let (multiply_tasks, sleep_tasks) = (MULTIPLY_TASKS[backend_index], SLEEP_TASKS[backend_index]);
    env.register("multiply", &guest("multiply"), &[]);
    env.register("hostile", &guest("hostile"), &[]);

    // The expected result of every task, by task id.
    let mut expected: HashMap<String, Value> = HashMap::new();
    for round in 0..SUBMIT_ROUNDS {
        let xs: Vec<i64> = (0..multiply_tasks / SUBMIT_ROUNDS)
            .map(|_| rng.random_range(-1_000_000..1_000_000))
            .collect();
        let lines: Vec<String> = xs.iter().map(|x| json!({ "x": x }).to_string()).collect();
        let file = env.data_dir().join(format!("multiply-{round}.jsonl"));
        std::fs::write(&file, lines.join("\n")).expect("failed to write a payload file");
        let ids = env.submit_many("multiply", "{}", &["--payloads", path_str(&file)]);
        assert_eq!(ids.len(), xs.len(), "one task id per payload line");
        for (id, x) in ids.into_iter().zip(&xs) {
            expected.insert(id, json!({ "product": x * 2 }));
        }

        let sleeps: Vec<u64> = (0..sleep_tasks / SUBMIT_ROUNDS)
            .map(|_| rng.random_range(20..=80))
            .collect();
        let lines: Vec<String> = sleeps
            .iter()
            .map(|ms| json!({ "mode": "sleep", "ms": ms }).to_string())
            .collect();
        let file = env.data_dir().join(format!("sleep-{round}.jsonl"));
        std::fs::write(&file, lines.join("\n")).expect("failed to write a payload file");
        let ids = env.submit_many("hostile", "{}", &["--payloads", path_str(&file)]);
        assert_eq!(ids.len(), sleeps.len(), "one task id per payload line");
        for (id, ms) in ids.into_iter().zip(&sleeps) {
            expected.insert(id, json!({ "slept_ms": ms }));
        }
    }
    let total = multiply_tasks + sleep_tasks;
    assert_eq!(expected.len(), total, "task ids are unique");

    // Kill the daemon at seeded moments, each time while this daemon runs attempts.
    let kills = rng.random_range(3..=5);
    let started = Instant::now();
    let mut daemon = env.start_daemon(&KILL_TEST_DAEMON);
    let backend = env.backend();
    let mut running_at_kills = Vec::new();
    for kill in 1..=kills {
        std::thread::sleep(Duration::from_millis(rng.random_range(200..1_000)));
        let pid = daemon.pid();
        let running = env.wait_for(
            &format!(
                "an attempt of daemon {pid} to run before kill {kill} of {kills} (seed {seed})"
            ),
            RUNNING_TIMEOUT,
            || Some(running_on(&*backend, pid)).filter(|&count| count > 0),
        );
        daemon.kill();
        running_at_kills.push(running);
        daemon = env.start_daemon(&KILL_TEST_DAEMON);
    }
    eprintln!("{kills} kills with {running_at_kills:?} tasks RUNNING at each");

    // Each probe reads both task tables whole, so it runs twice a second.
    env.wait_for_every(
        &format!("all {total} tasks to finish after {kills} kills (seed {seed})"),
        DRAIN_TIMEOUT,
        Duration::from_millis(500),
        || {
            let finished = env.row_keys(TaskTable::Finished).len();
            let active = env.row_keys(TaskTable::Active).len();
            // On Azure a kill between the record's move and the message's deletion leaves
            // the message, which is delivered again after its lease and acknowledged as a
            // duplicate. SQLite does both in one transaction, so its queue is checked once.
            let queue_drained = !env.is_azure() || env.queue_length() == 0;
            (finished == total && active == 0 && queue_drained).then_some(())
        },
    );
    eprintln!(
        "all tasks finished {:?} after the first start",
        started.elapsed()
    );

    // A task leased ahead has begun its attempt, so each kill counts a lost attempt for
    // it although its guest never ran. One leased ahead at five kills in a row is
    // dead-lettered as a message that crashes its worker would be, which this test
    // allows, because `bgw requeue` brings it back. Any other dead letter fails below.
    let letters = env.dead_letters_json();
    for letter in &letters {
        let reason = letter["Reason"].as_str().unwrap_or("");
        if !reason.contains("attempts in a row that recorded no outcome") {
            continue;
        }
        let id = letter["Id"].as_str().expect("a dead letter has an Id");
        env.run_ok(&["requeue", id]);
    }
    if !letters.is_empty() {
        eprintln!("{} tasks requeued after lost attempts", letters.len());
        env.wait_for_every(
            &format!("the requeued tasks to finish (seed {seed})"),
            DRAIN_TIMEOUT,
            Duration::from_millis(500),
            || {
                let done = env.row_keys(TaskTable::Finished).len() == total
                    && env.row_keys(TaskTable::Active).is_empty()
                    && env.queue_length() == 0;
                done.then_some(())
            },
        );
    }
    assert!(
        daemon.is_alive(),
        "the last daemon still runs{}",
        daemon.log_tail()
    );

    // The store: one finished row per task, nothing active, nothing queued.
    let (finished_rows, finished_ids) = rows_and_ids(&env, TaskTable::Finished);
    assert_eq!(
        env.row_keys(TaskTable::Active).len(),
        0,
        "no record is left in the active table (seed {seed})"
    );
    assert_eq!(
        finished_rows, total,
        "one finished row per task (seed {seed})"
    );
    assert_eq!(
        finished_ids, total,
        "no task id appears twice in the finished table (seed {seed})"
    );
    assert_eq!(env.queue_length(), 0, "the queue is empty (seed {seed})");
    let letters = env.dead_letters_json();
    assert!(
        letters.is_empty(),
        "{} messages were dead-lettered (seed {seed}), for example: {:#?}",
        letters.len(),
        &letters[..letters.len().min(3)]
    );

    // The records: each submitted task completed with its own result.
    let records = env.list_json();
    assert_eq!(records.len(), total, "`bgw list` shows every task once");
    let listed: HashSet<&str> = records
        .iter()
        .map(|record| record["RowKey"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(listed.len(), total, "`bgw list` shows no task twice");
    let mut reruns = 0;
    for record in &records {
        let id = record["RowKey"].as_str().unwrap_or("");
        let Some(result) = expected.get(id) else {
            panic!("task {id} was never submitted (seed {seed}): {record:#}");
        };
        assert_eq!(
            record["Status"], "COMPLETED",
            "task {id} completed (seed {seed}): {record:#}"
        );
        assert_eq!(&output_of(record), result, "task {id} has its own result");
        let attempt = record["Attempt"].as_u64().unwrap_or(0);
        assert!(attempt >= 1, "task {id} records its attempt: {record:#}");
        if attempt > 1 {
            reruns += 1;
        }
    }
    eprintln!("{reruns} tasks ran more than once");
    assert!(
        reruns > 0,
        "some tasks that were leased or running at a kill ran again with Attempt > 1 \
         (seed {seed}, RUNNING at kills: {running_at_kills:?})"
    );
}

fn crash_loop_dead_letters_after_five_deliveries(env: TestEnv) {
    env.register("hostile", &guest("hostile"), &[]);
    let id = env.submit("hostile", r#"{"mode": "sleep", "ms": 5000}"#, &[]);
    let daemon_args = ["--concurrency", "1", "--visibility-timeout", "1"];

    // Kill the worker during each of the five deliveries the daemon allows.
    for delivery in 1..=MAX_DELIVERIES {
        let mut daemon = env.start_daemon(&daemon_args);
        let record = env.wait_for(
            &format!("delivery {delivery} of task {id} to run"),
            RUNNING_TIMEOUT,
            || {
                let record = env.status_json(&id);
                let running = record["Status"] == "RUNNING" && record["Attempt"] == delivery;
                running.then_some(record)
            },
        );
        let host = record["HostId"].as_str().unwrap_or("");
        assert!(
            host.ends_with(&format!(":{}", daemon.pid())),
            "the new daemon runs delivery {delivery}: {record:#}"
        );
        daemon.kill();
    }

    // The sixth delivery is over the limit: the task ends ERROR without running again.
    let _daemon = env.start_daemon(&daemon_args);
    let record = env.wait_one(&id, Duration::from_secs(20));
    assert_eq!(record["Status"], "ERROR", "record: {record:#}");
    let error = record["ErrorMessage"].as_str().unwrap_or("");
    assert!(
        error.contains("delivered 6 times"),
        "the error counts the deliveries: {record:#}"
    );
    assert!(
        error.contains("limit of 5 deliveries"),
        "the error names the delivery limit: {record:#}"
    );
    assert_eq!(
        record["Attempt"], MAX_DELIVERIES,
        "no sixth attempt started: {record:#}"
    );

    let letters = env.dead_letters_json();
    assert_eq!(letters.len(), 1, "one dead letter: {letters:#?}");
    let letter = &letters[0];
    assert_eq!(letter["RowKey"], id.as_str(), "dead letter: {letter:#}");
    assert_eq!(letter["DequeueCount"], 6, "dead letter: {letter:#}");
    assert!(
        letter["Reason"]
            .as_str()
            .unwrap_or("")
            .contains("limit of 5 deliveries"),
        "the reason names the delivery limit: {letter:#}"
    );
    assert_eq!(env.queue_length(), 0, "queue");
    assert_eq!(
        env.row_keys(TaskTable::Active).len(),
        0,
        "the ERROR record is in the finished table"
    );

    // Requeued, the task runs again, and this time nothing kills its worker.
    let letter_id = letter["Id"].as_str().expect("dead letter ids are strings");
    env.run_ok(&["requeue", letter_id]);
    let record = env.wait_one(&id, Duration::from_secs(30));
    assert_eq!(record["Status"], "COMPLETED", "record: {record:#}");
    assert_eq!(output_of(&record), json!({ "slept_ms": 5000 }));
    // The first entry is the outcome of lost attempt 5. An attempt whose renewals failed is
    // interrupted and records nothing, so one more 5 s entry shows that keep-alive renewed
    // the 1 s lease throughout.
    let history = record["AttemptHistory"]
        .as_array()
        .unwrap_or_else(|| panic!("AttemptHistory is not an array: {record:#}"));
    assert_eq!(history.len(), 2, "the 5 s attempt ran once: {record:#}");
    assert_eq!(history[0]["Attempt"], MAX_DELIVERIES, "{record:#}");
    let time = |field: &str| {
        let text = history[1][field].as_str().unwrap_or_default();
        chrono::DateTime::parse_from_rfc3339(text)
            .unwrap_or_else(|error| panic!("{field} {text:?} is not RFC 3339: {error}"))
    };
    let ran = time("EndTime") - time("StartTime");
    assert!(
        ran >= chrono::TimeDelta::seconds(5),
        "the attempt ran {ran} under a 1 s lease: {record:#}"
    );
    assert_eq!(
        env.dead_letters_json().len(),
        0,
        "requeue removed the dead letter"
    );
}

fn paused_worker_cannot_overwrite_new_owner(env: TestEnv) {
    env.register("hostile", &guest("hostile"), &[]);
    let daemon_args = ["--concurrency", "1", "--visibility-timeout", "2"];
    let mut first = env.start_daemon(&daemon_args);
    let id = env.submit("hostile", r#"{"mode": "sleep", "ms": 4000}"#, &[]);
    env.wait_for(
        &format!("task {id} to run on the first daemon"),
        RUNNING_TIMEOUT,
        || (env.status_json(&id)["Status"] == "RUNNING").then_some(()),
    );

    // Pause the first daemon until its lease expires and a second daemon takes the task.
    first.signal(libc::SIGSTOP);
    let second = env.start_daemon(&daemon_args);
    let takeover = env.wait_for(
        "the second daemon to take the task over",
        RUNNING_TIMEOUT,
        || {
            let record = env.status_json(&id);
            (record["Status"] == "RUNNING" && record["Attempt"] == 2).then_some(record)
        },
    );
    first.signal(libc::SIGCONT);
    let second_host = format!(":{}", second.pid());
    assert!(
        takeover["HostId"]
            .as_str()
            .unwrap_or("")
            .ends_with(&second_host),
        "attempt 2 runs on the second daemon: {takeover:#}"
    );

    // The first daemon's attempt ends too, but its receipt is stale, so it writes nothing.
    env.wait_for(
        "the first daemon to notice its lost lease",
        RUNNING_TIMEOUT,
        || {
            let log = first.log();
            (log.contains("outcome discarded") || log.contains("lease lost")).then_some(())
        },
    );
    let record = env.wait_one(&id, Duration::from_secs(30));
    assert_eq!(record["Status"], "COMPLETED", "record: {record:#}");
    assert_eq!(
        record["Attempt"], 2,
        "the new owner's outcome is kept: {record:#}"
    );
    assert!(
        record["HostId"]
            .as_str()
            .unwrap_or("")
            .ends_with(&second_host),
        "the new owner's outcome is kept: {record:#}"
    );
    assert_eq!(
        record["AttemptHistory"].as_array().map(Vec::len),
        Some(1),
        "only the new owner's attempt is recorded: {record:#}"
    );
    assert_eq!(env.row_keys(TaskTable::Finished).len(), 1, "finished rows");
    assert_eq!(env.row_keys(TaskTable::Active).len(), 0, "active rows");
    assert_eq!(env.queue_length(), 0, "queue");
    assert!(
        first.is_alive(),
        "the first daemon runs on{}",
        first.log_tail()
    );
}

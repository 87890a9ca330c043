//! Several processes on one SQLite file: daemons, submitters and a reader. Checks that no
//! task is lost or run twice and that no process reports a locked or busy database while
//! the others write. Also one daemon that runs more attempts at once than the sandbox's
//! instance pool held before the pool was sized from `--concurrency`.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use bgw::client::WorkflowClient;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use support::{guest, output_of, path_str, runtime, test_seed, Daemon, TestEnv};

/// Processes that submit at the same time.
const SUBMITTERS: usize = 3;

/// `bgw submit --payloads` calls per submitter.
const SUBMITS_PER_SUBMITTER: usize = 5;

/// Payload lines, and so tasks, per submit call.
const TASKS_PER_SUBMIT: usize = 100;

/// Daemons of the single-submit test.
const SINGLE_SUBMIT_DAEMONS: usize = 8;

/// Tasks of the single-submit test, each started by its own `start_activity` call.
const SINGLE_SUBMITS: usize = 1_000;

/// Text that would show a lock or busy error of SQLite reaching a user.
const BUSY_MARKERS: [&str; 3] = ["database is locked", "SQLITE_BUSY", "stayed busy"];

/// Maximum time for every task to finish after the last submit.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(90);

/// Worker slots of the wide daemon: more than the 256 instances of the sandbox's former
/// fixed pool.
const WIDE_CONCURRENCY: usize = 260;

/// Sleep of each task of the wide daemon. Every task must start before the first one ends.
const WIDE_SLEEP: Duration = Duration::from_secs(3);

/// Returns the first busy marker that `text` contains.
fn busy_marker_in(text: &str) -> Option<&'static str> {
    BUSY_MARKERS
        .into_iter()
        .find(|marker| text.to_lowercase().contains(&marker.to_lowercase()))
}

#[test]
fn concurrency_above_256_runs_every_task() {
    let env = TestEnv::new();
    env.register("sleepy", &guest("hostile"), &["--max-attempts", "1"]);
    let payload = json!({"mode": "sleep", "ms": WIDE_SLEEP.as_millis() as u64}).to_string();
    let count = WIDE_CONCURRENCY.to_string();
    let ids = env.submit_many("sleepy", &payload, &["--count", &count]);
    let _daemon = env.start_daemon(&["--concurrency", &count]);

    let records = env.wait_all(&ids, DRAIN_TIMEOUT);
    let mut starts = Vec::new();
    for (id, record) in &records {
        assert_eq!(record["Status"], "COMPLETED", "task {id}: {record:#}");
        assert_eq!(record["Attempt"], 1, "task {id} ran once: {record:#}");
        let start = record["StartTime"].as_str().unwrap_or_default();
        starts.push(
            chrono::DateTime::parse_from_rfc3339(start)
                .unwrap_or_else(|error| panic!("task {id}: StartTime {start:?}: {error}")),
        );
    }
    let first = starts.iter().min().expect("tasks were submitted");
    let last = starts.iter().max().expect("tasks were submitted");
    assert!(
        (*last - *first).to_std().unwrap_or_default() < WIDE_SLEEP,
        "all {WIDE_CONCURRENCY} tasks ran at once: starts spread from {first} to {last}"
    );
}

#[test]
fn two_daemons_and_submitters_share_one_file() {
    let seed = test_seed();
    let env = TestEnv::new();
    env.register("multiply", &guest("multiply"), &[]);
    let daemon_args = ["--concurrency", "4"];
    let first = env.start_daemon(&daemon_args);
    let second = env.start_daemon(&daemon_args);

    // Each submitter writes its own payload files with seeded values of x.
    let expected: Mutex<HashMap<String, Value>> = Mutex::new(HashMap::new());
    let outputs: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());
    let submitted_ids: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let submitting_done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let mut submitters = Vec::new();
        for submitter in 0..SUBMITTERS {
            let (env, expected, outputs, submitted_ids) =
                (&env, &expected, &outputs, &submitted_ids);
            submitters.push(scope.spawn(move || {
                let mut rng = StdRng::seed_from_u64(seed.wrapping_add(submitter as u64));
                for call in 0..SUBMITS_PER_SUBMITTER {
                    let xs: Vec<i64> = (0..TASKS_PER_SUBMIT)
                        .map(|_| rng.random_range(-1_000_000..1_000_000))
                        .collect();
                    let lines: Vec<String> =
                        xs.iter().map(|x| json!({ "x": x }).to_string()).collect();
                    let file = env
                        .data_dir()
                        .join(format!("payloads-{submitter}-{call}.jsonl"));
                    std::fs::write(&file, lines.join("\n")).expect("failed to write payloads");
                    let args = [
                        "submit",
                        "multiply",
                        "--resource",
                        "res-concurrent",
                        "--payloads",
                        path_str(&file),
                    ];
                    let result = env.run(&args);
                    let described = format!("submitter {submitter} call {call}");
                    outputs.lock().unwrap().push((
                        described.clone(),
                        format!("{}{}", result.stdout, result.stderr),
                    ));
                    assert_eq!(
                        result.code(),
                        0,
                        "{described} failed (seed {seed}):\n{}{}",
                        result.stderr,
                        env.daemon_log_tails()
                    );
                    let ids: Vec<String> = result.stdout.lines().map(str::to_owned).collect();
                    assert_eq!(ids.len(), xs.len(), "{described} printed one id per line");
                    let mut expected = expected.lock().unwrap();
                    for (id, x) in ids.iter().zip(&xs) {
                        expected.insert(id.clone(), json!({ "product": x * 2 }));
                    }
                    submitted_ids.lock().unwrap().extend(ids);
                }
            }));
        }

        // A reader looks up random submitted tasks and lists recent ones meanwhile.
        let (env, outputs, submitted_ids, submitting_done) =
            (&env, &outputs, &submitted_ids, &submitting_done);
        let reader = scope.spawn(move || {
            let mut rng = StdRng::seed_from_u64(seed.wrapping_add(1_000));
            let mut lookups = 0;
            while !submitting_done.load(std::sync::atomic::Ordering::Relaxed) {
                let pick = {
                    let ids = submitted_ids.lock().unwrap();
                    (!ids.is_empty()).then(|| ids[rng.random_range(0..ids.len())].clone())
                };
                let result = match &pick {
                    Some(id) => env.run(&["status", id.as_str()]),
                    None => env.run(&["list", "--limit", "20"]),
                };
                let described = format!("reader lookup {lookups} of {pick:?}");
                keep_lookup(outputs, described, &result, seed);
                lookups += 1;
            }
            lookups
        });

        for submitter in submitters {
            submitter.join().expect("a submitter panicked");
        }
        submitting_done.store(true, std::sync::atomic::Ordering::Relaxed);
        let lookups = reader.join().expect("the reader panicked");
        eprintln!("the reader made {lookups} lookups while tasks were submitted");
    });

    let expected = expected.into_inner().unwrap();
    let total = SUBMITTERS * SUBMITS_PER_SUBMITTER * TASKS_PER_SUBMIT;
    assert_eq!(expected.len(), total, "every submit returned new task ids");
    let mut daemons = [first, second];
    let per_host = assert_each_task_completed_once(&env, &expected, &mut daemons, seed);
    assert_eq!(
        per_host.len(),
        2,
        "the tasks ran on exactly the two daemons: {per_host:?}"
    );
    assert_eq!(
        daemons_that_ran_tasks(&daemons, &per_host),
        2,
        "both daemons ran tasks (pids {} and {}): {per_host:?}",
        daemons[0].pid(),
        daemons[1].pid()
    );

    // No process printed a lock error, and no worker lost a lease.
    for (described, text) in outputs.into_inner().unwrap() {
        if let Some(marker) = busy_marker_in(&text) {
            panic!("{described} printed {marker:?} (seed {seed}):\n{text}");
        }
    }
    assert_daemon_logs_clean(&daemons, seed);
    for daemon in &mut daemons {
        daemon.stop();
    }
}

#[test]
fn single_submits_to_eight_daemons() {
    let seed = test_seed();
    let env = TestEnv::new();
    env.register("multiply", &guest("multiply"), &[]);
    let mut daemons: Vec<Daemon<'_>> = (0..SINGLE_SUBMIT_DAEMONS)
        .map(|_| env.start_daemon(&["--concurrency", "2"]))
        .collect();

    // The test process is the client: one `start_activity` call per task, each awaited
    // before the next. Meanwhile a reader runs `bgw status` on random submitted tasks.
    let expected: Mutex<HashMap<String, Value>> = Mutex::new(HashMap::new());
    let submitted_ids: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let reader_outputs: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());
    let submitting_done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let (env, expected, submitted_ids, submitting_done) =
            (&env, &expected, &submitted_ids, &submitting_done);
        let client = scope.spawn(move || {
            let client = WorkflowClient::new(env.backend(), path_str(&env.db_path()));
            let runtime = runtime();
            let mut rng = StdRng::seed_from_u64(seed);
            for call in 0..SINGLE_SUBMITS {
                let x: i64 = rng.random_range(-1_000_000..1_000_000);
                let payload = json!({ "x": x }).to_string();
                let started = runtime.block_on(client.start_activity(
                    "multiply",
                    "res-single",
                    payload.as_bytes(),
                    None,
                ));
                let id = started.unwrap_or_else(|error| {
                    panic!(
                        "start_activity call {call} failed (seed {seed}): {error:#}{}",
                        env.daemon_log_tails()
                    )
                });
                expected
                    .lock()
                    .unwrap()
                    .insert(id.clone(), json!({ "product": x * 2 }));
                submitted_ids.lock().unwrap().push(id);
            }
            submitting_done.store(true, std::sync::atomic::Ordering::Relaxed);
        });

        let reader_outputs = &reader_outputs;
        let reader = scope.spawn(move || {
            let mut rng = StdRng::seed_from_u64(seed.wrapping_add(1_000));
            let mut lookups = 0;
            while !submitting_done.load(std::sync::atomic::Ordering::Relaxed) {
                let pick = {
                    let ids = submitted_ids.lock().unwrap();
                    (!ids.is_empty()).then(|| ids[rng.random_range(0..ids.len())].clone())
                };
                let Some(id) = pick else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                let result = env.run(&["status", id.as_str()]);
                let described = format!("reader lookup {lookups} of {id}");
                keep_lookup(reader_outputs, described, &result, seed);
                lookups += 1;
            }
            lookups
        });

        let client_result = client.join();
        // A client that panicked never sets the flag, so it is set here to stop the reader.
        submitting_done.store(true, std::sync::atomic::Ordering::Relaxed);
        let lookups = reader.join().expect("the reader panicked");
        client_result.expect("the client panicked");
        eprintln!("the reader made {lookups} lookups while tasks were submitted");
        assert!(
            lookups > 0,
            "the reader looked up tasks while they were submitted"
        );
    });

    let expected = expected.into_inner().unwrap();
    assert_eq!(
        expected.len(),
        SINGLE_SUBMITS,
        "every start_activity call returned a new task id"
    );
    let per_host = assert_each_task_completed_once(&env, &expected, &mut daemons, seed);
    let ran = daemons_that_ran_tasks(&daemons, &per_host);
    assert_eq!(
        per_host.len(),
        ran,
        "every task ran on one of the {SINGLE_SUBMIT_DAEMONS} daemons: {per_host:?}"
    );
    assert!(
        ran >= 2,
        "tasks were spread over several daemons, not run by one: {per_host:?}"
    );

    for (described, text) in reader_outputs.into_inner().unwrap() {
        if let Some(marker) = busy_marker_in(&text) {
            panic!("{described} printed {marker:?} (seed {seed}):\n{text}");
        }
    }
    assert_daemon_logs_clean(&daemons, seed);
    for daemon in &mut daemons {
        daemon.stop();
    }
}

/// Waits until every task of `expected` has finished, then checks the end state of a run
/// on one file. Each task COMPLETED once with its own result, the finished table has one
/// row per task, nothing is queued or dead-lettered, and every daemon still runs. Returns
/// the number of tasks each host id ran.
fn assert_each_task_completed_once(
    env: &TestEnv,
    expected: &HashMap<String, Value>,
    daemons: &mut [Daemon<'_>],
    seed: u64,
) -> HashMap<String, usize> {
    let total = expected.len();
    env.wait_for(
        &format!("all {total} tasks to finish (seed {seed})"),
        DRAIN_TIMEOUT,
        || {
            let finished = env.query_count("SELECT count(*) FROM FinishedTasks");
            let active = env.query_count("SELECT count(*) FROM ActiveTasks");
            (finished as usize == total && active == 0).then_some(())
        },
    );
    for daemon in daemons.iter_mut() {
        assert!(
            daemon.is_alive(),
            "daemon {} still runs{}",
            daemon.pid(),
            daemon.log_tail()
        );
    }

    // Nothing lost, nothing left over, nothing run twice.
    assert_eq!(
        env.query_count("SELECT count(DISTINCT row_key) FROM FinishedTasks"),
        total as i64,
        "one finished row per task"
    );
    assert_eq!(
        env.query_count("SELECT count(*) FROM bgw_queue"),
        0,
        "queue"
    );
    assert_eq!(
        env.query_count("SELECT count(*) FROM bgw_dead_letters"),
        0,
        "dead letters"
    );
    let records = env.list_json();
    assert_eq!(records.len(), total, "`bgw list` shows every task once");
    let mut per_host: HashMap<String, usize> = HashMap::new();
    for record in &records {
        let id = record["RowKey"].as_str().unwrap_or("");
        let result = expected
            .get(id)
            .unwrap_or_else(|| panic!("task {id} was never submitted: {record:#}"));
        assert_eq!(record["Status"], "COMPLETED", "task {id}: {record:#}");
        assert_eq!(&output_of(record), result, "task {id} has its own result");
        assert_eq!(
            record["Attempt"], 1,
            "task {id} ran once, with no daemon killed: {record:#}"
        );
        assert_eq!(
            record["AttemptHistory"].as_array().map(Vec::len),
            Some(1),
            "task {id} has one finished attempt: {record:#}"
        );
        let host = record["HostId"].as_str().unwrap_or("").to_owned();
        *per_host.entry(host).or_default() += 1;
    }
    eprintln!("tasks per host: {per_host:?}");
    per_host
}

/// Returns how many of `daemons` appear in `per_host`. Host ids are `HOSTNAME:PID`.
fn daemons_that_ran_tasks(daemons: &[Daemon<'_>], per_host: &HashMap<String, usize>) -> usize {
    let hosts: HashSet<String> = daemons
        .iter()
        .filter_map(|daemon| {
            per_host
                .keys()
                .find(|host| host.ends_with(&format!(":{}", daemon.pid())))
                .cloned()
        })
        .collect();
    hosts.len()
}

/// Checks that no daemon logged a busy error, a lost lease or an error.
fn assert_daemon_logs_clean(daemons: &[Daemon<'_>], seed: u64) {
    for daemon in daemons {
        let log = daemon.log();
        if let Some(marker) = busy_marker_in(&log) {
            panic!(
                "daemon {} logged {marker:?} (seed {seed}){}",
                daemon.pid(),
                daemon.log_tail()
            );
        }
        for line in log.lines() {
            assert!(
                !line.contains("lease lost") && !line.contains("outcome discarded"),
                "daemon {} lost a lease: {line}",
                daemon.pid()
            );
            assert!(
                !line.contains(" ERROR "),
                "daemon {} logged an error: {line}",
                daemon.pid()
            );
        }
    }
}

/// Stores the output of a reader's lookup for the later checks of every output, and
/// asserts that the lookup succeeded.
fn keep_lookup(
    outputs: &Mutex<Vec<(String, String)>>,
    described: String,
    result: &support::CommandResult,
    seed: u64,
) {
    let output = format!("{}{}", result.stdout, result.stderr);
    outputs.lock().unwrap().push((described.clone(), output));
    assert_eq!(
        result.code(),
        0,
        "{described} failed (seed {seed}):\n{}",
        result.stderr
    );
}

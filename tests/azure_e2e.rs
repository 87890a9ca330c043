//! End-to-end tests on Azure Storage: the real `bgw` binary and daemons with
//! `STORE_MODE=azure` against the Azurite of `BGW_TEST_AZURE_CONNECTION_STRING` (started
//! by `tests/azurite`). Each test has its own tables and queue; hosts of one test share
//! them and the component registry, each with its own data directory.

mod support;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::faults::{Action, FaultProxy, Request, Service};
use support::{guest, output_of, path_str, skewed_clock_env, TestEnv};

const TASK_TIMEOUT: Duration = Duration::from_secs(90);

fn status_of(record: &Value) -> &str {
    record["Status"].as_str().unwrap_or("<no Status>")
}

#[test]
fn azure_multiply_returns_product() {
    let Some(env) = TestEnv::azure() else { return };
    env.register("multiply", &guest("multiply"), &[]);
    let _daemon = env.start_daemon(&["--concurrency", "2"]);

    let id = env.submit("multiply", r#"{"x": 21}"#, &[]);
    let record = env.wait_one(&id, TASK_TIMEOUT);
    assert_eq!(status_of(&record), "COMPLETED", "{record:#}");
    assert_eq!(output_of(&record), json!({"product": 42}));
    assert!(
        record["HostId"].as_str().is_some(),
        "HostId is recorded: {record:#}"
    );
    assert!(record["StartTime"].as_str().is_some(), "{record:#}");
    assert_eq!(env.run_json(&["result", &id]), json!({"product": 42}));
}

#[test]
fn azure_word_count_reads_and_writes_blobs() {
    let Some(env) = TestEnv::azure() else { return };
    env.register("word-count", &guest("word-count"), &[]);
    let _daemon = env.start_daemon(&["--concurrency", "2"]);

    let text = "The cat and the hat.\nthe end";
    let input = env.data_dir().join("words.txt");
    std::fs::write(&input, text).unwrap();
    let id = env.submit("word-count", r#"{"top": 1}"#, &["--blob", path_str(&input)]);
    let record = env.wait_one(&id, TASK_TIMEOUT);
    assert_eq!(status_of(&record), "COMPLETED", "{record:#}");
    let result = output_of(&record);
    assert_eq!(result["total_words"], json!(7), "{result}");
    assert_eq!(
        result["top"],
        json!([{"word": "the", "count": 3}]),
        "{result}"
    );

    let csv_path = env.data_dir().join("words.csv");
    env.run_ok(&["result", &id, "--output-blob", path_str(&csv_path)]);
    let csv = std::fs::read_to_string(&csv_path).expect("the output blob was saved");
    assert!(csv.starts_with("word,count\nthe,3\n"), "{csv}");
}

#[test]
fn azure_hostile_task_hits_fuel_limit() {
    let Some(env) = TestEnv::azure() else { return };
    env.register(
        "spin-fuel",
        &guest("hostile"),
        &["--fuel", "50000000", "--max-attempts", "1"],
    );
    env.register("multiply", &guest("multiply"), &[]);
    let _daemon = env.start_daemon(&["--concurrency", "2"]);

    let spin = env.submit("spin-fuel", r#"{"mode": "spin"}"#, &[]);
    let healthy = env.submit("multiply", r#"{"x": 2}"#, &[]);
    let records = env.wait_all(&[spin.clone(), healthy.clone()], TASK_TIMEOUT);
    let failed = &records[&spin];
    assert_eq!(status_of(failed), "ERROR", "{failed:#}");
    let message = failed["ErrorMessage"].as_str().unwrap_or_default();
    assert!(message.contains("fuel limit exceeded"), "{failed:#}");
    assert_eq!(status_of(&records[&healthy]), "COMPLETED");
}

#[test]
fn azure_hot_swap_reaches_other_host() {
    let Some(admin) = TestEnv::azure() else {
        return;
    };
    let host = admin.another_host();
    let v1 = admin.register("word-count", &guest("word-count"), &[]);
    let _daemon = host.start_daemon(&["--concurrency", "2"]);
    let input = admin.data_dir().join("words.txt");
    std::fs::write(&input, "alpha beta beta\n").unwrap();

    let before = admin.submit("word-count", r#"{"top": 1}"#, &["--blob", path_str(&input)]);
    let record = admin.wait_one(&before, TASK_TIMEOUT);
    assert_eq!(record["ComponentDigest"], v1["digest"], "{record:#}");
    assert!(output_of(&record).get("version").is_none());

    // The registry is in the storage account, so the other host sees the new version.
    let v2 = admin.register("word-count", &guest("word-count-v2"), &[]);
    std::thread::sleep(Duration::from_secs(2));
    let after = admin.submit("word-count", r#"{"top": 1}"#, &["--blob", path_str(&input)]);
    let record = admin.wait_one(&after, TASK_TIMEOUT);
    assert_eq!(status_of(&record), "COMPLETED", "{record:#}");
    assert_eq!(record["ComponentDigest"], v2["digest"], "{record:#}");
    assert!(output_of(&record).get("version").is_some(), "{record:#}");
}

#[test]
fn azure_three_hosts_survive_a_killed_host() {
    const TASKS: usize = 2_000;
    let Some(client) = TestEnv::azure() else {
        return;
    };
    client.register("multiply", &guest("multiply"), &[]);
    let hosts: Vec<TestEnv> = (0..3).map(|_| client.another_host()).collect();
    let mut daemons: Vec<_> = hosts
        .iter()
        .map(|host| host.start_daemon(&["--concurrency", "4", "--visibility-timeout", "5"]))
        .collect();

    let ids = client.submit_many("multiply", r#"{"x": 3}"#, &["--count", &TASKS.to_string()]);
    assert_eq!(ids.len(), TASKS);

    // Kill one host once some tasks are done and others are still queued.
    let started = Instant::now();
    loop {
        let done = client
            .list_json()
            .iter()
            .filter(|record| status_of(record) == "COMPLETED")
            .count();
        if done >= TASKS / 4 {
            break;
        }
        assert!(
            started.elapsed() < TASK_TIMEOUT,
            "only {done} tasks completed"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let killed = daemons.remove(0);
    let killed_pid = killed.pid();
    // SAFETY: kill(2) with a pid this test started; no memory is shared.
    unsafe {
        libc::kill(killed_pid as i32, libc::SIGKILL);
    }

    let records = client.wait_all(&ids, Duration::from_secs(300));
    let mut by_host: HashMap<String, usize> = HashMap::new();
    for id in &ids {
        let record = &records[id];
        assert_eq!(status_of(record), "COMPLETED", "{record:#}");
        assert_eq!(output_of(record), json!({"product": 6}), "{record:#}");
        let host = record["HostId"].as_str().unwrap_or("<none>").to_owned();
        *by_host.entry(host).or_default() += 1;
    }

    // Exactly once: every task id appears once in the listing of both tables.
    let listed = client.list_json();
    let unique: HashSet<&str> = listed.iter().filter_map(|r| r["RowKey"].as_str()).collect();
    assert_eq!(listed.len(), TASKS, "one record per task");
    assert_eq!(unique.len(), TASKS, "no task id twice");
    assert!(
        by_host.len() >= 2,
        "tasks ran on several hosts: {by_host:?}"
    );
    let queue_left = client.run_ok(&["dead-letters"]);
    assert!(
        !queue_left.contains("task"),
        "no dead letters: {queue_left}"
    );
    drop(killed);
}

/// Runs two daemons on one queue, where only one has the activity type. The other puts
/// each task it leases back in the queue to wait for a component instead of dropping it.
#[test]
fn azure_host_without_type_leaves_task_queued() {
    let Some(client) = TestEnv::azure() else {
        return;
    };
    client.register("multiply", &guest("multiply"), &[]);
    let lacking = client.another_host_with_own_registry();
    let _lacking_daemon = lacking.start_daemon(&["--concurrency", "2"]);

    let ids = client.submit_many("multiply", r#"{"x": 5}"#, &["--count", "6"]);
    let waited = client.wait_for(
        "the host without the type to lease a task",
        TASK_TIMEOUT,
        || {
            let records = client.list_json();
            records.into_iter().find(|r| {
                r["ErrorMessage"]
                    .as_str()
                    .unwrap_or("")
                    .contains("waiting up to 30 s")
            })
        },
    );
    assert_eq!(status_of(&waited), "CREATED", "{waited:#}");

    let host = client.another_host();
    let daemon = host.start_daemon(&["--concurrency", "2"]);
    let host_id_suffix = format!(":{}", daemon.pid());
    let records = client.wait_all(&ids, TASK_TIMEOUT);
    for (id, record) in &records {
        assert_eq!(status_of(record), "COMPLETED", "{id}: {record:#}");
        assert_eq!(
            output_of(record),
            json!({"product": 10}),
            "{id}: {record:#}"
        );
        let host_id = record["HostId"].as_str().unwrap_or("");
        assert!(
            host_id.ends_with(&host_id_suffix),
            "{id} ran on the host that has the type: {record:#}"
        );
    }
    assert!(
        client.dead_letters_json().is_empty(),
        "nothing is dead-lettered"
    );
}

/// Returns the time of a record field, which must be UTC with an explicit `Z`.
fn utc_time_of(id: &str, record: &Value, field: &str) -> chrono::DateTime<chrono::Utc> {
    let text = record[field].as_str().unwrap_or_default();
    assert!(text.ends_with('Z'), "{id}: {field} is UTC with Z: {text:?}");
    chrono::DateTime::parse_from_rfc3339(text)
        .unwrap_or_else(|error| panic!("{id}: {field} {text:?}: {error}"))
        .with_timezone(&chrono::Utc)
}

/// Returns the variables of a daemon in time zone `tz` whose clock is shifted by `skew`.
fn daemon_vars<'a>(tz: &'a str, skew: &'a [(&'static str, String)]) -> Vec<(&'a str, &'a str)> {
    let mut vars = vec![("TZ", tz)];
    vars.extend(skew.iter().map(|(name, value)| (*name, value.as_str())));
    vars
}

/// Runs three daemons whose wall clocks are right, ten minutes ahead and ten minutes
/// behind, with a visibility timeout of 4 s. The queue service decides when a lease
/// expires, so no lease expires early and no task runs twice.
#[test]
fn azure_skewed_clocks_run_each_task_once() {
    const TASKS: usize = 40;
    const SKEW: chrono::TimeDelta = chrono::TimeDelta::minutes(10);
    /// Slack for the checks that each host's clock was shifted.
    const SLACK: chrono::TimeDelta = chrono::TimeDelta::minutes(1);
    let Some(client) = TestEnv::azure() else {
        return;
    };
    let (Some(ahead), Some(behind)) = (skewed_clock_env("+10m"), skewed_clock_env("-10m")) else {
        return;
    };
    client.register("sleeper", &guest("hostile"), &[]);

    let hosts: Vec<TestEnv> = (0..3).map(|_| client.another_host()).collect();
    let args = ["--concurrency", "2", "--visibility-timeout", "4"];
    let started = chrono::Utc::now();
    let daemons = [
        hosts[0].start_daemon_with_env(&args, &[("TZ", "UTC")]),
        hosts[1].start_daemon_with_env(&args, &daemon_vars("America/Los_Angeles", &ahead)),
        hosts[2].start_daemon_with_env(&args, &daemon_vars("UTC", &behind)),
    ];
    let offsets = [chrono::TimeDelta::zero(), SKEW, -SKEW];
    let submitted = client
        .command(&[
            "submit",
            "sleeper",
            "--resource",
            "res-skew",
            "--payload",
            r#"{"mode": "sleep", "ms": 1000}"#,
            "--count",
            &TASKS.to_string(),
        ])
        .env("TZ", "Asia/Kolkata")
        .output()
        .expect("failed to run `bgw submit`");
    assert!(submitted.status.success(), "{submitted:?}");
    let ids: Vec<String> = String::from_utf8_lossy(&submitted.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(ids.len(), TASKS);
    let records = client.wait_all(&ids, TASK_TIMEOUT);
    let finished = chrono::Utc::now();

    let mut ran = [0; 3];
    for (id, record) in &records {
        assert_eq!(status_of(record), "COMPLETED", "{id}: {record:#}");
        assert_eq!(record["Attempt"], json!(1), "{id} ran once: {record:#}");
        let history = record["AttemptHistory"].as_array();
        assert_eq!(history.map(Vec::len), Some(1), "{id}: {record:#}");
        let start = utc_time_of(id, record, "StartTime");
        let end = utc_time_of(id, record, "EndTime");
        assert!(end >= start, "{id}: EndTime before StartTime: {record:#}");

        // Each host stamps the times with its own clock, shifted by its skew.
        let host_id = record["HostId"].as_str().unwrap_or_default();
        let host = daemons
            .iter()
            .position(|daemon| host_id.ends_with(&format!(":{}", daemon.pid())))
            .unwrap_or_else(|| panic!("{id} ran on an unknown host {host_id:?}"));
        ran[host] += 1;
        let offset = offsets[host];
        assert!(
            start > started + offset - SLACK && end < finished + offset + SLACK,
            "{id}: the times of host {host} are not shifted by {offset}: {record:#}"
        );
    }
    assert!(
        ran.iter().all(|&count| count > 0),
        "every host ran a task: {ran:?}"
    );
    for daemon in &daemons {
        assert!(
            !daemon.log().contains("lease lost"),
            "no lease was lost{}",
            daemon.log_tail()
        );
    }
}

/// Runs a daemon ten minutes ahead and one ten minutes behind, each on its own queue, with
/// a task of a type that is not registered yet. Both count the grace period on the queue
/// service's clock, so neither gives up ten minutes early or late.
#[test]
fn azure_skewed_clocks_wait_whole_component_grace() {
    let Some(early_env) = TestEnv::azure() else {
        return;
    };
    let (Some(ahead), Some(behind)) = (skewed_clock_env("+10m"), skewed_clock_env("-10m")) else {
        return;
    };
    let late_env = early_env.another_deployment();
    let _ahead_daemon = early_env.start_daemon_with_env(
        &["--missing-component-grace", "20"],
        &daemon_vars("UTC", &ahead),
    );
    let _behind_daemon = late_env.start_daemon_with_env(
        &["--missing-component-grace", "2"],
        &daemon_vars("UTC", &behind),
    );
    let waiting = early_env.submit("late-type", r#"{"x": 4}"#, &[]);
    let failing = late_env.submit("late-type", r#"{"x": 4}"#, &[]);

    // Ahead: the task waits for its component instead of failing at once.
    let seen = early_env.wait_for("the task to wait or end", TASK_TIMEOUT, || {
        let record = early_env.status_json(&waiting);
        let message = record["ErrorMessage"].as_str().unwrap_or_default();
        (message.contains("waiting up to") || support::is_terminal(&record)).then_some(record)
    });
    assert_eq!(status_of(&seen), "CREATED", "{seen:#}");
    early_env.register("late-type", &guest("multiply"), &[]);
    let record = early_env.wait_one(&waiting, TASK_TIMEOUT);
    assert_eq!(status_of(&record), "COMPLETED", "{record:#}");
    assert_eq!(output_of(&record), json!({"product": 8}));

    // Behind: the task ends ERROR after about 2 s, not 10 minutes later.
    let record = late_env.wait_one(&failing, Duration::from_secs(30));
    assert_eq!(status_of(&record), "ERROR", "{record:#}");
    let message = record["ErrorMessage"].as_str().unwrap_or_default();
    assert!(message.contains("within 2 s"), "{record:#}");
}

/// An input blob upload whose response is lost may have been stored. The client deletes
/// it, so a failed submit leaves no blob.
#[test]
fn azure_lost_upload_response_leaves_no_blob() {
    let Some(mut env) = TestEnv::azure() else {
        return;
    };
    let azurite = support::azure_connection_string().expect("an Azure environment has one");
    let proxy = FaultProxy::start(&azurite);
    env.route_through(&proxy);
    // The SDK retries the lost upload for 1 s, then fails.
    env.set_store_variable("BGW_AZURE_MAX_RETRY_SECS", "1");
    let container = format!("lost-{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
    // The container exists, so that the lost upload is stored.
    let first = bgw::backend::BlobRef {
        container: container.clone(),
        name: "first".to_owned(),
    };
    let blobs = env.backend();
    blobs.blobs().put(&first, &mut &b"x"[..]).unwrap();
    blobs.blobs().delete(&first).unwrap();
    let uploads = format!("/{container}/");
    let rule = proxy.add(
        Action::DropResponse,
        Box::new(move |request: &Request| {
            request.service == Service::Blob
                && request.method == "PUT"
                && request.path.contains(&uploads)
        }),
    );

    let client = bgw::client::WorkflowClient::new(env.backend(), "lost-upload");
    let mut data: &[u8] = b"an input that the service stores";
    let blob = bgw::client::InputBlob {
        container: Some(container.clone()),
        name: None,
        data: &mut data,
    };
    let submitted = support::runtime().block_on(client.start_activity(
        "multiply",
        "r",
        br#"{"x": 1}"#,
        Some(blob),
    ));

    let error = submitted.expect_err("the upload's response never arrives");
    assert!(
        format!("{error:#}").contains("failed to upload blob"),
        "{error:#}"
    );
    assert!(proxy.hits(rule) >= 1, "the upload went through the proxy");
    assert_eq!(
        env.azure_blob_names(&container, ""),
        Vec::<String>::new(),
        "the stored upload is deleted"
    );
    assert!(env.list_json().is_empty(), "no task was stored");
}

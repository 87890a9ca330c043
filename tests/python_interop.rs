//! Interoperability with the Python library `background-workflows` 0.3.0 on Azure: its
//! client starts a task that a `bgw` daemon runs, and it reads tasks that `bgw submit`
//! created. The library is installed into a virtual environment at
//! `$CARGO_TARGET_DIR/py-venv` (or `target/py-venv`) on first use.

mod support;

use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use support::{guest, output_of, TestEnv};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/python_interop.py");
const TASK_TIMEOUT: Duration = Duration::from_secs(90);

/// Runs the driver script with the environment's Azure settings and parses its output.
fn run_python(env: &TestEnv, args: &[&str]) -> Value {
    let mut command = Command::new(support::python_with_library());
    command.arg(SCRIPT).args(args);
    for name in [
        "AZURE_STORAGE_CONNECTION_STRING",
        "ACTIVE_TABLE_NAME",
        "FINISHED_TABLE_NAME",
        "BGW_QUEUE",
    ] {
        command.env(
            name,
            env.store_variable(name).expect("an Azure environment"),
        );
    }
    command.env("STORE_MODE", "azure");
    let output = command.output().expect("failed to run python");
    assert!(
        output.status.success(),
        "python_interop.py {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|error| panic!("{error}: {stdout}"))
}

#[test]
fn python_client_task_runs_on_bgw() {
    let Some(env) = TestEnv::azure() else { return };
    env.register("multiply", &guest("multiply"), &[]);
    let _daemon = env.start_daemon(&["--concurrency", "2"]);

    let started = run_python(&env, &["start", "multiply", "res-py", r#"{"x": 21}"#]);
    let task_id = started.as_str().expect("a task id").to_owned();
    let record = env.wait_one(&task_id, TASK_TIMEOUT);
    assert_eq!(record["Status"], "COMPLETED", "{record:#}");
    assert_eq!(output_of(&record), json!({"product": 42}));

    let status = run_python(&env, &["status", &task_id, "res-py"]);
    assert_eq!(status, json!("COMPLETED"));
    let result = run_python(&env, &["result", &task_id, "res-py"]);
    assert_eq!(result, json!({"product": 42}));
}

#[test]
fn bgw_task_reads_in_python_client() {
    let Some(env) = TestEnv::azure() else { return };
    env.register("multiply", &guest("multiply"), &[]);

    let task_id = env.submit("multiply", r#"{"x": 4}"#, &["--resource", "res-bgw"]);
    let status = run_python(&env, &["status", &task_id, "res-bgw"]);
    assert_eq!(status, json!("CREATED"));
    assert_eq!(
        run_python(&env, &["result", &task_id, "res-bgw"]),
        Value::Null
    );

    let _daemon = env.start_daemon(&["--concurrency", "1"]);
    env.wait_one(&task_id, TASK_TIMEOUT);
    let status = run_python(&env, &["status", &task_id, "res-bgw"]);
    assert_eq!(status, json!("COMPLETED"));
    let result = run_python(&env, &["result", &task_id, "res-bgw"]);
    assert_eq!(result, json!({"product": 8}));
}

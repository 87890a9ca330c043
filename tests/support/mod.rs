//! Shared helpers of the integration tests: where the example guests are, and a test
//! environment that runs the real `bgw` binary on a temporary data directory.

#![allow(dead_code)]

pub mod faults;

use std::path::PathBuf;

/// Directory of the built example guests: `BGW_GUEST_DIR`, or the shared target directory.
pub fn guest_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("BGW_GUEST_DIR") {
        return PathBuf::from(dir);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("wasm32-wasip2/release")
}

/// Path of one built guest, e.g. `guest("multiply")`. Panics with the build command when
/// the guest is missing, so a test never passes without its component.
pub fn guest(name: &str) -> PathBuf {
    let path = guest_dir().join(format!("{}.wasm", name.replace('-', "_")));
    assert!(
        path.is_file(),
        "guest component {} is missing: build the guests with `examples/build` first",
        path.display()
    );
    path
}

/// Reads one built guest's bytes.
pub fn guest_bytes(name: &str) -> Vec<u8> {
    std::fs::read(guest(name)).expect("failed to read the guest component")
}

use std::collections::{HashMap, HashSet};
use std::io::{Read, Seek, SeekFrom};
use std::marker::PhantomData;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Resource id that `TestEnv::submit` uses unless the extra arguments name one.
pub const DEFAULT_RESOURCE: &str = "res-e2e";

/// Environment variables that select a data directory, store or configuration. They are
/// removed from every `bgw` process, so the developer's shell cannot change a test.
const ISOLATED_VARIABLES: [&str; 12] = [
    "BGW_DATA_DIR",
    "BGW_CONFIG",
    "STORE_MODE",
    "SQLITE_DB_PATH",
    "AZURE_STORAGE_CONNECTION_STRING",
    "ACTIVE_TABLE_NAME",
    "FINISHED_TABLE_NAME",
    "BGW_QUEUE",
    "BGW_COMPONENT_TABLE",
    "BGW_AZURE_SUBMIT_VISIBILITY_SECS",
    "BGW_AZURE_MAX_RETRY_SECS",
    "RUST_LOG",
];

/// Time a daemon gets to stop after SIGTERM before it is killed.
const DAEMON_STOP_GRACE: Duration = Duration::from_secs(10);

/// Time a daemon gets to log that it started.
const DAEMON_START_TIMEOUT: Duration = Duration::from_secs(20);

/// Number of log lines a failure message quotes from each daemon.
const LOG_TAIL_LINES: usize = 40;

/// Interval between polls of the task list while waiting.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Returns `BGW_TEST_AZURE_CONNECTION_STRING`, or `None` with a note when it is not set.
/// Under `CI=true` a missing value panics: CI must never skip the Azure tests.
pub fn azure_connection_string() -> Option<String> {
    let value = std::env::var("BGW_TEST_AZURE_CONNECTION_STRING")
        .ok()
        .filter(|value| !value.is_empty());
    if value.is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "BGW_TEST_AZURE_CONNECTION_STRING is not set, and CI must run the Azure tests: \
             start Azurite with tests/azurite"
        );
        eprintln!("skipping: BGW_TEST_AZURE_CONNECTION_STRING is not set (see tests/azurite)");
    }
    value
}

/// Returns the environment that runs a process with its wall clock shifted by `offset`
/// (libfaketime's syntax, such as `+10m`), or `None` with a note when libfaketime is not
/// installed. Under `CI=true` a missing library panics: CI must never skip the skew tests.
///
/// The monotonic clock is left alone (`FAKETIME_DONT_FAKE_MONOTONIC=1`), as on a host
/// whose wall clock is wrong. `BGW_TEST_LIBFAKETIME` names the library if it is elsewhere.
pub fn skewed_clock_env(offset: &str) -> Option<Vec<(&'static str, String)>> {
    let library = std::env::var("BGW_TEST_LIBFAKETIME")
        .ok()
        .filter(|path| !path.is_empty())
        .or_else(|| {
            // Where the Debian package and a source build put the library.
            let debian = format!(
                "/usr/lib/{}-linux-gnu/faketime/libfaketime.so.1",
                std::env::consts::ARCH
            );
            let source_build = "/usr/local/lib/faketime/libfaketime.so.1".to_owned();
            [debian, source_build]
                .into_iter()
                .find(|path| Path::new(path).is_file())
        });
    let Some(library) = library else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "libfaketime is not installed, and CI must run the clock-skew tests: install the \
             Debian package faketime, as tests/run does, or set BGW_TEST_LIBFAKETIME"
        );
        eprintln!("skipping: libfaketime is not installed (Debian package faketime)");
        return None;
    };
    Some(vec![
        ("LD_PRELOAD", library),
        ("FAKETIME", offset.to_owned()),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_owned()),
    ])
}

/// A temporary data directory and the `bgw` commands that run on it. The directory is
/// deleted on drop. The daemons it started borrow it, so they are stopped before that.
pub struct TestEnv {
    dir: tempfile::TempDir,
    daemon_logs: Mutex<Vec<PathBuf>>,
    /// Variables set on every `bgw` process, such as the Azure store settings.
    store_env: Vec<(String, String)>,
    /// Connection string of Azurite itself, for the checks that read the account
    /// directly, also when `bgw` goes through a fault proxy.
    azurite_connection: Option<String>,
}

/// What one `bgw` command returned.
#[derive(Debug)]
pub struct CommandResult {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CommandResult {
    /// Returns the exit code, panicking if a signal ended the process.
    pub fn code(&self) -> i32 {
        self.status
            .code()
            .unwrap_or_else(|| panic!("bgw was ended by a signal: {self:?}"))
    }
}

impl From<Output> for CommandResult {
    fn from(output: Output) -> Self {
        CommandResult {
            status: output.status,
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }
}

impl TestEnv {
    /// Creates an environment with an empty data directory.
    pub fn new() -> TestEnv {
        let dir = tempfile::Builder::new()
            .prefix("bgw-e2e-")
            .tempdir()
            .expect("failed to create a temporary data directory");
        TestEnv {
            dir,
            daemon_logs: Mutex::new(Vec::new()),
            store_env: Vec::new(),
            azurite_connection: None,
        }
    }

    /// Creates an environment on the Azurite of `BGW_TEST_AZURE_CONNECTION_STRING`, with
    /// its own task tables, queue and registry table. Returns `None` when the variable is
    /// not set, except under `CI=true`, where it panics because CI must run the Azure tests.
    pub fn azure() -> Option<TestEnv> {
        let connection = azure_connection_string()?;
        let unique = uuid::Uuid::new_v4().simple().to_string();
        let mut env = TestEnv::new();
        env.azurite_connection = Some(connection.clone());
        env.store_env = vec![
            ("STORE_MODE".into(), "azure".into()),
            ("AZURE_STORAGE_CONNECTION_STRING".into(), connection),
            ("ACTIVE_TABLE_NAME".into(), format!("A{}", &unique[..16])),
            ("FINISHED_TABLE_NAME".into(), format!("F{}", &unique[..16])),
            ("BGW_QUEUE".into(), format!("q-{}", &unique[..16])),
            ("BGW_COMPONENT_TABLE".into(), format!("C{}", &unique[..16])),
        ];
        Some(env)
    }

    /// Creates another deployment: on Azure new task tables, queue and registry table in
    /// the same account, on SQLite a new data directory.
    pub fn another_deployment(&self) -> TestEnv {
        match self.is_azure() {
            true => TestEnv::azure().expect("the Azure connection string is still set"),
            false => TestEnv::new(),
        }
    }

    /// Creates another host: a new data directory on the same store as this one.
    pub fn another_host(&self) -> TestEnv {
        let mut env = TestEnv::new();
        env.store_env = self.store_env.clone();
        env.azurite_connection = self.azurite_connection.clone();
        env
    }

    /// Creates another Azure host that shares the task tables and queue of this one but has
    /// an empty registry table of its own, so it has no component of any activity type.
    pub fn another_host_with_own_registry(&self) -> TestEnv {
        assert!(
            self.is_azure(),
            "only Azure can give one host its own registry"
        );
        let mut env = self.another_host();
        let unique = uuid::Uuid::new_v4().simple().to_string();
        for (name, value) in &mut env.store_env {
            if name == "BGW_COMPONENT_TABLE" {
                *value = format!("C{}", &unique[..16]);
            }
        }
        env
    }

    /// Sets a store variable on every later `bgw` process and library call of this
    /// environment, replacing an earlier value.
    pub fn set_store_variable(&mut self, name: &str, value: &str) {
        self.store_env.retain(|(key, _)| key != name);
        self.store_env.push((name.to_owned(), value.to_owned()));
    }

    /// Sends every later `bgw` process and library call of this Azure environment through
    /// a fault proxy. Direct checks of the account still go to Azurite.
    pub fn route_through(&mut self, proxy: &faults::FaultProxy) {
        assert!(self.is_azure(), "only an Azure environment has a proxy");
        self.set_store_variable("AZURE_STORAGE_CONNECTION_STRING", proxy.connection_string());
    }

    /// Returns the value of a store variable this environment sets.
    pub fn store_variable(&self, name: &str) -> Option<&str> {
        self.store_env
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    /// Returns the data directory.
    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Builds a `bgw` command on this data directory, with the isolated variables removed.
    pub fn command<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_bgw"));
        command.arg("--data-dir").arg(self.data_dir());
        command.args(args);
        for name in ISOLATED_VARIABLES {
            command.env_remove(name);
        }
        for (name, value) in &self.store_env {
            command.env(name, value);
        }
        command.stdin(Stdio::null());
        command
    }

    /// Runs a `bgw` command to its end and returns its exit status and output.
    pub fn run<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> CommandResult {
        let output = self
            .command(args)
            .output()
            .expect("failed to start the bgw binary");
        output.into()
    }

    /// Runs a `bgw` command that must exit 0, and returns its stdout.
    pub fn run_ok<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> String {
        let result = self.run(args);
        if result.code() != 0 {
            panic!(
                "`bgw {}` exited with {}\nstdout:\n{}\nstderr:\n{}{}",
                describe_args(args),
                result.code(),
                result.stdout,
                result.stderr,
                self.daemon_log_tails()
            );
        }
        result.stdout
    }

    /// Runs a `bgw --json` command that must exit 0, and parses its stdout.
    pub fn run_json<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Value {
        let mut all: Vec<&std::ffi::OsStr> = vec!["--json".as_ref()];
        all.extend(args.iter().map(AsRef::as_ref));
        let stdout = self.run_ok(&all);
        serde_json::from_str(&stdout)
            .unwrap_or_else(|error| panic!("`bgw --json` printed invalid JSON: {error}\n{stdout}"))
    }

    /// Registers a component for an activity type and returns the version record.
    pub fn register(&self, activity_type: &str, component: &Path, extra_args: &[&str]) -> Value {
        let mut args = vec!["register", activity_type, path_str(component)];
        args.extend_from_slice(extra_args);
        self.run_json(&args)
    }

    /// Submits one task and returns its id. The resource is [`DEFAULT_RESOURCE`] unless
    /// `extra_args` contains `--resource`.
    pub fn submit(&self, activity_type: &str, payload: &str, extra_args: &[&str]) -> String {
        let ids = self.submit_many(activity_type, payload, extra_args);
        assert_eq!(ids.len(), 1, "expected one task id, got {ids:?}");
        ids.into_iter().next().expect("checked above")
    }

    /// Submits tasks (use `--count N` in `extra_args` for several) and returns their ids.
    pub fn submit_many(
        &self,
        activity_type: &str,
        payload: &str,
        extra_args: &[&str],
    ) -> Vec<String> {
        let mut args = vec!["submit", activity_type, "--payload", payload];
        if !extra_args.contains(&"--resource") {
            args.extend_from_slice(&["--resource", DEFAULT_RESOURCE]);
        }
        args.extend_from_slice(extra_args);
        let stdout = self.run_ok(&args);
        let ids: Vec<String> = stdout.lines().map(str::to_owned).collect();
        assert!(!ids.is_empty(), "`bgw submit` printed no task id");
        ids
    }

    /// Returns a task's record as `bgw status ID --json` prints it.
    pub fn status_json(&self, task_id: &str) -> Value {
        self.run_json(&["status", task_id])
    }

    /// Returns every task record, newest first.
    pub fn list_json(&self) -> Vec<Value> {
        match self.run_json(&["list", "--limit", "1000000"]) {
            Value::Array(records) => records,
            other => panic!("`bgw list --json` printed no array: {other}"),
        }
    }

    /// Waits until every task has a terminal status and returns the records by task id.
    /// Panics after `timeout` with the statuses still open and the daemon log tails.
    pub fn wait_all(&self, task_ids: &[String], timeout: Duration) -> HashMap<String, Value> {
        let requested: HashSet<&str> = task_ids.iter().map(String::as_str).collect();
        let started = Instant::now();
        loop {
            let records: HashMap<String, Value> = self
                .list_json()
                .into_iter()
                .filter(|record| requested.contains(record["RowKey"].as_str().unwrap_or("")))
                .map(|record| (record["RowKey"].as_str().unwrap_or("").to_owned(), record))
                .collect();
            let open: Vec<String> = task_ids
                .iter()
                .filter(|id| !records.get(*id).is_some_and(is_terminal))
                .map(|id| match records.get(id) {
                    Some(record) => format!("{id} {}", record["Status"]),
                    None => format!("{id} missing"),
                })
                .collect();
            if open.is_empty() {
                return records;
            }
            if started.elapsed() > timeout {
                panic!(
                    "{} of {} tasks did not finish within {timeout:?}, for example:\n{}{}",
                    open.len(),
                    task_ids.len(),
                    open.iter().take(10).cloned().collect::<Vec<_>>().join("\n"),
                    self.daemon_log_tails()
                );
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Waits for one task and returns its record.
    pub fn wait_one(&self, task_id: &str, timeout: Duration) -> Value {
        let mut records = self.wait_all(&[task_id.to_owned()], timeout);
        records
            .remove(task_id)
            .expect("wait_all returns every task")
    }

    /// Starts `bgw daemon` with extra arguments and waits until it logs that it started.
    /// Its stderr goes to `daemon-N.log` in the data directory, and its shutdown grace is
    /// 2 s unless `args` sets `--shutdown-grace`.
    pub fn start_daemon(&self, args: &[&str]) -> Daemon<'_> {
        self.start_daemon_with_env(args, &[])
    }

    /// Starts `bgw daemon` as `start_daemon` does, with extra environment variables.
    pub fn start_daemon_with_env(&self, args: &[&str], vars: &[(&str, &str)]) -> Daemon<'_> {
        let log_path = {
            let mut logs = self.daemon_logs.lock().unwrap_or_else(|e| e.into_inner());
            let path = self
                .data_dir()
                .join(format!("daemon-{}.log", logs.len() + 1));
            logs.push(path.clone());
            path
        };
        let log = std::fs::File::create(&log_path).expect("failed to create the daemon log");
        let mut all = vec!["daemon"];
        if !args.contains(&"--shutdown-grace") {
            // A test that fails while a task runs should not wait out the 30 s default.
            all.extend_from_slice(&["--shutdown-grace", "2"]);
        }
        all.extend_from_slice(args);
        let mut command = self.command(&all);
        command
            .env("RUST_LOG", "info")
            .envs(vars.iter().copied())
            .stdout(Stdio::null())
            .stderr(log);
        kill_with_parent(&mut command);
        let child = command.spawn().expect("failed to start `bgw daemon`");
        let mut daemon = Daemon {
            child,
            log_path,
            env: PhantomData,
        };

        let started = Instant::now();
        while !daemon.log().contains("daemon started") {
            if let Some(status) = daemon.exit_status() {
                panic!(
                    "`bgw daemon` exited with {status} at start-up{}",
                    daemon.log_tail()
                );
            }
            if started.elapsed() > DAEMON_START_TIMEOUT {
                panic!(
                    "`bgw daemon` did not log \"daemon started\" within {DAEMON_START_TIMEOUT:?}{}",
                    daemon.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        daemon
    }

    /// Returns the last lines of every daemon log of this environment, for failure messages.
    pub fn daemon_log_tails(&self) -> String {
        let logs = self.daemon_logs.lock().unwrap_or_else(|e| e.into_inner());
        logs.iter().map(|path| tail_of(path)).collect()
    }
}

impl Default for TestEnv {
    fn default() -> Self {
        TestEnv::new()
    }
}

/// A running `bgw daemon`. Dropping it sends SIGTERM and waits, and sends SIGKILL when the
/// daemon has not stopped after 10 s, also while a test unwinds from a panic.
pub struct Daemon<'env> {
    child: Child,
    log_path: PathBuf,
    env: PhantomData<&'env TestEnv>,
}

impl Daemon<'_> {
    /// Returns the process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Returns the exit status if the process has ended.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child
            .try_wait()
            .expect("failed to check whether the daemon runs")
    }

    /// Returns true while the process runs.
    pub fn is_alive(&mut self) -> bool {
        self.exit_status().is_none()
    }

    /// Returns the whole log, stderr of the daemon.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Returns the last lines of the log, formatted for a failure message.
    pub fn log_tail(&self) -> String {
        tail_of(&self.log_path)
    }

    /// Sends SIGTERM and waits for the exit, with SIGKILL after the grace period.
    pub fn stop(&mut self) -> ExitStatus {
        // SAFETY: kill only sends a signal to the child this guard started and has not reaped.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let started = Instant::now();
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return status,
                Ok(None) if started.elapsed() < DAEMON_STOP_GRACE => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = self.child.kill();
                    return self
                        .child
                        .wait()
                        .expect("failed to wait for the killed daemon");
                }
            }
        }
    }
}

impl Drop for Daemon<'_> {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

/// Makes the kernel send SIGKILL to a child, such as a daemon, when the thread that started
/// it ends, so a test process killed from outside leaves no child behind.
pub fn kill_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the child between fork and exec and calls only prctl,
    // which is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Returns true when a record's status is COMPLETED, ERROR or CANCELLED.
pub fn is_terminal(record: &Value) -> bool {
    matches!(
        record["Status"].as_str(),
        Some("COMPLETED" | "ERROR" | "CANCELLED")
    )
}

/// Parses a record's OutputPayload, panicking with the record when it is not JSON.
pub fn output_of(record: &Value) -> Value {
    let text = record["OutputPayload"].as_str().unwrap_or("");
    serde_json::from_str(text)
        .unwrap_or_else(|error| panic!("OutputPayload is not JSON ({error}) in record {record:#}"))
}

/// Returns a path as `&str`, panicking on a non-UTF-8 path, which tests never create.
pub fn path_str(path: &Path) -> &str {
    path.to_str().expect("test paths are UTF-8")
}

fn describe_args<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> String {
    let words: Vec<String> = args
        .iter()
        .map(|arg| {
            let text = arg.as_ref().to_string_lossy();
            if text.chars().count() > 80 {
                format!("{}...", text.chars().take(80).collect::<String>())
            } else {
                text.into_owned()
            }
        })
        .collect();
    words.join(" ")
}

/// Reads the last lines of a log file, without terminal colour codes.
fn tail_of(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut file) = std::fs::File::open(path) {
        let length = file.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = file.seek(SeekFrom::Start(length.saturating_sub(64 * 1024)));
        let mut bytes = Vec::new();
        let _ = file.read_to_end(&mut bytes);
        text = String::from_utf8_lossy(&bytes).into_owned();
    }
    let plain = strip_ansi(&text);
    let lines: Vec<&str> = plain.lines().collect();
    let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
    format!(
        "\n--- last lines of {} ---\n{}\n",
        path.display(),
        tail.join("\n")
    )
}

/// Removes ANSI escape sequences such as colour codes.
fn strip_ansi(text: &str) -> String {
    let mut plain = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(ch) = chars.next() {
        if ch != '\u{1b}' {
            plain.push(ch);
            continue;
        }
        if chars.next() == Some('[') {
            for next in chars.by_ref() {
                if next.is_ascii_alphabetic() {
                    break;
                }
            }
        }
    }
    plain
}

/// Returns the seed of a randomized test: `BGW_TEST_SEED` when set, otherwise one taken
/// from the clock. The seed is printed, so a failing run can be replayed.
pub fn test_seed() -> u64 {
    let seed = match std::env::var("BGW_TEST_SEED") {
        Ok(text) => text
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("invalid BGW_TEST_SEED {text:?}: expected an integer")),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_nanos() as u64),
    };
    eprintln!("test seed {seed}: replay with BGW_TEST_SEED={seed}");
    seed
}

impl TestEnv {
    /// Returns true when this environment stores its tasks in Azure Storage.
    pub fn is_azure(&self) -> bool {
        self.store_variable("STORE_MODE") == Some("azure")
    }

    /// Returns the settings that a `bgw` command of this environment resolves.
    pub fn settings(&self) -> bgw::config::Settings {
        let lookup = |name: &str| self.store_variable(name).map(str::to_owned);
        self.settings_with(&lookup)
    }

    /// Returns the settings with the store variables that `lookup` returns.
    fn settings_with(&self, lookup: &dyn Fn(&str) -> Option<String>) -> bgw::config::Settings {
        let overrides = bgw::config::Overrides {
            data_dir: Some(self.data_dir().to_owned()),
            ..Default::default()
        };
        bgw::config::Settings::resolve_with(&overrides, lookup)
            .expect("the test environment's settings are valid")
    }

    /// Opens the backend of this environment past any fault proxy, for checks that must
    /// work while the proxy rejects requests.
    fn direct_backend(&self) -> std::sync::Arc<dyn bgw::backend::Backend> {
        let lookup = |name: &str| match (name, &self.azurite_connection) {
            ("AZURE_STORAGE_CONNECTION_STRING", Some(direct)) => Some(direct.clone()),
            _ => self.store_variable(name).map(str::to_owned),
        };
        bgw::open_backend(&self.settings_with(&lookup))
            .expect("failed to open the test environment's backend")
    }

    /// Opens the backend of this environment through the library, as another producer in
    /// the same deployment would.
    pub fn backend(&self) -> std::sync::Arc<dyn bgw::backend::Backend> {
        bgw::open_backend(&self.settings()).expect("failed to open the test environment's backend")
    }

    /// Returns the RowKey of every record in the active or the finished table, one entry
    /// per row, read from the store itself, so that a task in both tables or twice in one
    /// cannot hide behind `bgw list`.
    pub fn row_keys(&self, table: TaskTable) -> Vec<String> {
        let settings = self.settings();
        let name = match table {
            TaskTable::Active => settings.active_table_name.clone(),
            TaskTable::Finished => settings.finished_table_name.clone(),
        };
        if !self.is_azure() {
            let connection = self.open_db_read_only();
            let mut statement = connection
                .prepare(&format!("SELECT row_key FROM {name}"))
                .unwrap_or_else(|error| panic!("failed to read table {name}: {error}"));
            let keys = statement
                .query_map([], |row| row.get::<_, String>(0))
                .and_then(|rows| rows.collect::<Result<Vec<_>, _>>());
            return keys.unwrap_or_else(|error| panic!("failed to read table {name}: {error}"));
        }
        let service = azure::Service::connect(&self.azure_connection());
        runtime().block_on(service.row_keys(&name))
    }

    /// Returns the number of messages in the task queue, visible or not.
    pub fn queue_length(&self) -> u64 {
        let backend = self.direct_backend();
        runtime()
            .block_on(backend.queue_length())
            .expect("failed to read the queue length")
    }

    /// Returns the names of the blobs in a container of the environment's Azure account
    /// that start with `prefix`.
    pub fn azure_blob_names(&self, container: &str, prefix: &str) -> Vec<String> {
        let service = azure::Service::connect(&self.azure_connection());
        runtime().block_on(service.blob_names(container, prefix))
    }

    fn azure_connection(&self) -> String {
        self.azurite_connection
            .clone()
            .expect("an Azure test environment has a connection string")
    }

    /// Returns the path of the SQLite database file.
    pub fn db_path(&self) -> PathBuf {
        self.data_dir().join("bgw.db")
    }

    /// Opens the database file read-only, for checks that the CLI cannot make.
    pub fn open_db_read_only(&self) -> rusqlite::Connection {
        let connection = rusqlite::Connection::open_with_flags(
            self.db_path(),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap_or_else(|error| {
            panic!(
                "failed to open {} read-only: {error}",
                self.db_path().display()
            )
        });
        connection
            .busy_timeout(Duration::from_secs(10))
            .expect("failed to set the busy timeout");
        connection
    }

    /// Returns the single integer that `sql` selects, on a fresh read-only connection.
    pub fn query_count(&self, sql: &str) -> i64 {
        self.open_db_read_only()
            .query_row(sql, [], |row| row.get(0))
            .unwrap_or_else(|error| panic!("query {sql:?} failed: {error}"))
    }

    /// Polls `probe` every 50 ms until it returns a value, and panics after `timeout` with
    /// `description` and the daemon log tails.
    pub fn wait_for<T>(
        &self,
        description: &str,
        timeout: Duration,
        probe: impl FnMut() -> Option<T>,
    ) -> T {
        self.wait_for_every(description, timeout, Duration::from_millis(50), probe)
    }

    /// Polls `probe` as `wait_for` does, every `interval`, for probes too costly to run
    /// every 50 ms.
    pub fn wait_for_every<T>(
        &self,
        description: &str,
        timeout: Duration,
        interval: Duration,
        mut probe: impl FnMut() -> Option<T>,
    ) -> T {
        let started = Instant::now();
        loop {
            if let Some(value) = probe() {
                return value;
            }
            if started.elapsed() > timeout {
                panic!(
                    "timed out after {timeout:?} waiting for {description}{}",
                    self.daemon_log_tails()
                );
            }
            std::thread::sleep(interval);
        }
    }

    /// Waits until a task's record has `status` and returns the record.
    pub fn wait_for_status(&self, task_id: &str, status: &str, timeout: Duration) -> Value {
        self.wait_for(&format!("task {task_id} to be {status}"), timeout, || {
            let record = self.status_json(task_id);
            (record["Status"] == status).then_some(record)
        })
    }

    /// Returns the dead letters as `bgw dead-letters --json` prints them.
    pub fn dead_letters_json(&self) -> Vec<Value> {
        match self.run_json(&["dead-letters"]) {
            Value::Array(letters) => letters,
            other => panic!("`bgw dead-letters --json` printed no array: {other}"),
        }
    }
}

/// Creates a single-threaded tokio runtime for calling the library from a test.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("failed to build a tokio runtime")
}

impl Daemon<'_> {
    /// Sends SIGKILL, as a crash or the OOM killer would, and reaps the process.
    pub fn kill(&mut self) -> ExitStatus {
        self.child
            .kill()
            .expect("failed to send SIGKILL to the daemon");
        self.child
            .wait()
            .expect("failed to wait for the killed daemon")
    }

    /// Sends a signal such as `libc::SIGTERM` without waiting for the exit.
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill only sends a signal to the child this guard started and has not reaped.
        let sent = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        assert_eq!(sent, 0, "failed to send signal {signal} to the daemon");
    }

    /// Waits up to `timeout` for the process to exit and returns its status, or `None`
    /// while it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.exit_status() {
                return Some(status);
            }
            if started.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// One of the two task tables.
#[derive(Clone, Copy, Debug)]
pub enum TaskTable {
    Active,
    Finished,
}

/// Defines each listed test body, a `fn(TestEnv)`, as two tests: `sqlite::NAME` on a
/// temporary SQLite data directory and `azure::NAME` on Azurite. The Azure test returns
/// at once when `BGW_TEST_AZURE_CONNECTION_STRING` is unset, and panics then under
/// `CI=true`.
#[allow(unused_macros)]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[test]
                fn $name() {
                    super::$name($crate::support::TestEnv::new())
                }
            )*
        }

        mod azure {
            $(
                #[test]
                fn $name() {
                    let Some(env) = $crate::support::TestEnv::azure() else {
                        return;
                    };
                    super::$name(env)
                }
            )*
        }
    };
}
#[allow(unused_imports)]
pub(crate) use on_both_backends;

/// Direct reads of an Azure account, for checks that the backend traits cannot make.
mod azure {
    use azure_data_tables::prelude::TableServiceClient;
    use azure_storage::{CloudLocation, ConnectionString};
    use azure_storage_blobs::prelude::BlobServiceClient;
    use futures::StreamExt;

    pub struct Service {
        tables: TableServiceClient,
        blobs: BlobServiceClient,
    }

    impl Service {
        /// Connects with a connection string that names the table and blob endpoints,
        /// as `tests/azurite` prints it.
        pub fn connect(connection: &str) -> Service {
            let parsed =
                ConnectionString::new(connection).expect("the Azure connection string parses");
            let account = parsed.account_name.expect("AccountName is set").to_owned();
            let credentials = parsed
                .storage_credentials()
                .expect("the connection string has credentials");
            let location = |endpoint: Option<&str>| CloudLocation::Custom {
                account: account.clone(),
                uri: endpoint
                    .expect("the connection string names every endpoint")
                    .trim_end_matches('/')
                    .to_owned(),
            };
            let tables = azure_data_tables::clients::TableServiceClientBuilder::with_location(
                location(parsed.table_endpoint),
                credentials.clone(),
            )
            .build();
            let blobs = azure_storage_blobs::prelude::ClientBuilder::with_location(
                location(parsed.blob_endpoint),
                credentials,
            )
            .blob_service_client();
            Service { tables, blobs }
        }

        /// Returns the RowKey of every entity of a table; a missing table has none.
        pub async fn row_keys(&self, table: &str) -> Vec<String> {
            let mut pages = self
                .tables
                .table_client(table)
                .query()
                .select("RowKey")
                .into_stream::<serde_json::Value>();
            let mut keys = Vec::new();
            while let Some(page) = pages.next().await {
                let page = match page {
                    Ok(page) => page,
                    Err(error) if is_not_found(&error) => break,
                    Err(error) => panic!("failed to query table {table}: {error}"),
                };
                for entity in page.entities {
                    let key = entity["RowKey"].as_str().expect("entities have a RowKey");
                    keys.push(key.to_owned());
                }
            }
            keys
        }

        /// Returns the names of the blobs in a container that start with `prefix`.
        pub async fn blob_names(&self, container: &str, prefix: &str) -> Vec<String> {
            let mut pages = self
                .blobs
                .container_client(container)
                .list_blobs()
                .prefix(prefix.to_owned())
                .into_stream();
            let mut names = Vec::new();
            while let Some(page) = pages.next().await {
                let page = match page {
                    Ok(page) => page,
                    Err(error) if is_not_found(&error) => break,
                    Err(error) => panic!("failed to list container {container}: {error}"),
                };
                names.extend(page.blobs.blobs().map(|blob| blob.name.clone()));
            }
            names
        }
    }

    fn is_not_found(error: &azure_core::Error) -> bool {
        matches!(
            error.kind(),
            azure_core::error::ErrorKind::HttpResponse { status, .. } if u16::from(*status) == 404
        )
    }
}

/// The Python library that the interop tests install, at the version `bgw` follows.
const PYTHON_LIBRARY: &str = "background-workflows==0.3.0";

/// Returns the Python interpreter of a virtual environment with the Python library
/// installed: `target/py-venv`, created once and reused while it imports the library.
/// Panics with pip's output when the installation fails.
pub fn python_with_library() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
        let venv = target.join("py-venv");
        let python = venv.join("bin/python");
        let has_library = || {
            Command::new(&python)
                .args([
                    "-c",
                    "import importlib.metadata as m; assert m.version('background-workflows') == '0.3.0'",
                ])
                .output()
                .is_ok_and(|output| output.status.success())
        };
        if has_library() {
            return python;
        }

        let _ = std::fs::remove_dir_all(&venv);
        let created = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .output()
            .expect("failed to start python3 to create a virtual environment");
        assert!(
            created.status.success(),
            "`python3 -m venv {}` failed:\n{}",
            venv.display(),
            String::from_utf8_lossy(&created.stderr)
        );
        let installed = Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", PYTHON_LIBRARY])
            .output()
            .expect("failed to start pip");
        assert!(
            installed.status.success() && has_library(),
            "`pip install {PYTHON_LIBRARY}` failed:\n{}{}",
            String::from_utf8_lossy(&installed.stdout),
            String::from_utf8_lossy(&installed.stderr)
        );
        python
    })
}

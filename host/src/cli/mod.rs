//! Command-line parsing and dispatch. Exit codes: 0 done, 1 the command failed, 2 bad
//! usage, 3 a waited-for task ended ERROR or CANCELLED, 4 a wait timed out before its task
//! finished.

mod commands;
mod output;

use std::path::PathBuf;
use std::process::ExitCode;

use bgw::daemon::{MAX_CONCURRENCY, MAX_VISIBILITY_TIMEOUT};
use bgw::registry::{MAX_ATTEMPTS, MAX_FUEL, MAX_MEMORY_MIB, MAX_OUTPUT_BYTES, MAX_TIMEOUT_SECS};
use clap::{Args, Parser, Subcommand};

/// Maximum number of tasks one `bgw submit` starts.
const MAX_SUBMIT_COUNT: u64 = 10_000_000;

/// Exit code of a command that failed.
const EXIT_FAILURE: u8 = 1;
/// Exit code of bad usage, as clap uses for parse errors.
const EXIT_USAGE: u8 = 2;
/// Exit code when a task the command waited for ended ERROR or CANCELLED.
const EXIT_TASK_FAILED: u8 = 3;
/// Exit code when a wait timed out before its task finished, so that a script can tell a
/// task that is still running from a command that failed.
const EXIT_TIMED_OUT: u8 = 4;

/// Background tasks as WebAssembly components, each run in its own sandbox.
#[derive(Parser, Debug)]
#[command(name = "bgw", version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Global options")]
struct GlobalArgs {
    /// Data directory holding the SQLite file, blobs and components [env: BGW_DATA_DIR]
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// TOML configuration file [env: BGW_CONFIG; default: DATA_DIR/bgw.toml if present]
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Name of the task queue [env: BGW_QUEUE; default: bgw-tasks]
    #[arg(long, global = true, value_name = "NAME")]
    queue: Option<String>,
    /// Print records and lists as JSON with the stored field names
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the host daemon: lease tasks, run their components, record the outcomes
    Daemon(DaemonArgs),
    /// Register a component for an activity type (it takes effect in running daemons)
    ///
    /// The [limits] table of the configuration file (DATA_DIR/bgw.toml by default) sets the
    /// defaults of --fuel, --memory, --timeout and --max-output.
    Register(RegisterArgs),
    /// List registered activity types and their component versions
    Activities(ActivitiesArgs),
    /// Make the previous component version of an activity type current again
    ///
    /// After `unregister`, this makes the version current again that was current then.
    Rollback(RollbackArgs),
    /// Take an activity type out of service: no version stays current, and all are kept
    Unregister(UnregisterArgs),
    /// Start one or many tasks
    Submit(SubmitArgs),
    /// Show a task's status
    Status(TaskArgs),
    /// Wait until a task finishes and show its final record
    Wait(WaitArgs),
    /// Show a task's result, and save its output blob
    Result(ResultArgs),
    /// List tasks, newest first
    List(ListArgs),
    /// Cancel a task: a queued one never starts, a running one is stopped
    ///
    /// A RUNNING task that still waits for a worker slot, because a daemon leased it
    /// ahead, ends CANCELLED without starting when it gets the slot, unless it waited less
    /// than 250 ms.
    Cancel(TaskArgs),
    /// Delete finished tasks older than a number of days, with their blobs
    Prune(PruneArgs),
    /// List messages moved aside because they could not be processed
    DeadLetters,
    /// Send a dead-lettered message back to the queue
    Requeue(RequeueArgs),
}

#[derive(Args, Debug)]
struct DaemonArgs {
    /// Tasks run at once, from 1 to 1024 [default: number of cores, or the configuration's
    /// daemon.concurrency]
    #[arg(allow_negative_numbers = true, long, value_name = "N", value_parser = whole_number(1, MAX_CONCURRENCY))]
    concurrency: Option<usize>,
    /// Seconds a leased message stays hidden before another worker may take it over, from
    /// 1 to 604800 (7 days) [default: 30, or the configuration's
    /// daemon.visibility_timeout_secs]
    #[arg(allow_negative_numbers = true, long, value_name = "SECS", value_parser = whole_number(1, MAX_VISIBILITY_TIMEOUT.as_secs()))]
    visibility_timeout: Option<u64>,
    /// Seconds running tasks get to finish after SIGTERM or SIGINT, 0 or more
    #[arg(
        allow_negative_numbers = true,
        long,
        value_name = "SECS",
        default_value_t = 30,
        value_parser = whole_number(0, u64::MAX)
    )]
    shutdown_grace: u64,
    /// Seconds a task whose activity type has no component waits for a registration,
    /// counted from the first look at it, before it ends ERROR and is dead-lettered, 0 or
    /// more
    #[arg(
        allow_negative_numbers = true,
        long,
        value_name = "SECS",
        default_value_t = 30,
        value_parser = whole_number(0, u64::MAX)
    )]
    missing_component_grace: u64,
}

#[derive(Args, Debug)]
struct RegisterArgs {
    /// Activity type the component serves
    activity_type: String,
    /// Component file built for wasm32-wasip2 with the bgw guest SDK
    file: PathBuf,
    /// Fuel budget of one attempt, roughly one unit per wasm instruction, from 1 to
    /// 9223372036854775807 [default: 10000000000, or the configuration's limits.fuel]
    #[arg(allow_negative_numbers = true, long, value_name = "N", value_parser = whole_number(1, MAX_FUEL))]
    fuel: Option<u64>,
    /// Maximum linear memory of one attempt, in MiB, from 1 to 4096 [default: 512, or the
    /// configuration's limits.memory_mib]
    #[arg(allow_negative_numbers = true, long, value_name = "MIB", value_parser = whole_number(1, MAX_MEMORY_MIB))]
    memory: Option<u64>,
    /// Wall-clock deadline of one attempt, in seconds, from 1 to 604800 (7 days) [default:
    /// 60, or the configuration's limits.timeout_secs]
    #[arg(allow_negative_numbers = true, long, value_name = "SECS", value_parser = whole_number(1, MAX_TIMEOUT_SECS))]
    timeout: Option<u64>,
    /// Maximum size of the output blob, in bytes, from 0 to 9223372036854775807 [default:
    /// 268435456, or the configuration's limits.max_output_bytes]
    #[arg(allow_negative_numbers = true, long, value_name = "BYTES", value_parser = whole_number(0, MAX_OUTPUT_BYTES))]
    max_output: Option<u64>,
    /// Attempts in all before a failing task ends ERROR, from 1 to 100; 1 means no retry
    /// [default: 3]
    #[arg(allow_negative_numbers = true, long, value_name = "N", value_parser = whole_number(1, MAX_ATTEMPTS))]
    max_attempts: Option<u32>,
    /// Delay before the first retry in seconds, doubled for each later one, with jitter,
    /// from 0 to 86400 and at most --max-backoff [default: 1]
    #[arg(allow_negative_numbers = true, long, value_name = "SECS", value_parser = decimal("seconds", "from 0 to 86400"))]
    backoff: Option<f64>,
    /// Maximum delay between attempts, in seconds, from 0 to 86400 [default: 60]
    #[arg(allow_negative_numbers = true, long, value_name = "SECS", value_parser = decimal("seconds", "from 0 to 86400"))]
    max_backoff: Option<f64>,
}

#[derive(Args, Debug)]
struct ActivitiesArgs {
    /// Show only this activity type, with its whole version history
    activity_type: Option<String>,
}

#[derive(Args, Debug)]
struct RollbackArgs {
    /// Activity type to roll back
    activity_type: String,
}

#[derive(Args, Debug)]
struct UnregisterArgs {
    /// Activity type to unregister
    activity_type: String,
}

#[derive(Args, Debug)]
struct SubmitArgs {
    /// Activity type to start
    activity_type: String,
    /// Resource id (PartitionKey) the task belongs to
    #[arg(long, value_name = "ID")]
    resource: String,
    /// Payload: a JSON object, or @FILE to read it from a file
    #[arg(long, value_name = "JSON|@FILE", default_value = "{}")]
    payload: String,
    /// File of payloads, one JSON object per line: starts one task per line
    #[arg(long, value_name = "FILE", conflicts_with = "count")]
    payloads: Option<PathBuf>,
    /// Start N tasks with the same payload, from 1 to 10000000
    #[arg(
        allow_negative_numbers = true,
        long,
        value_name = "N",
        default_value_t = 1,
        value_parser = whole_number(1, MAX_SUBMIT_COUNT)
    )]
    count: u64,
    /// Input blob for the task
    #[arg(long, value_name = "FILE")]
    blob: Option<PathBuf>,
    /// Delay before the task may start, in seconds, from 0 to 2592000 (30 days)
    #[arg(
        allow_negative_numbers = true,
        long,
        value_name = "SECS",
        conflicts_with = "at", value_parser = decimal("seconds", "from 0 to 2592000"))]
    delay: Option<f64>,
    /// Time before which the task may not start, in RFC 3339 (2026-12-24T18:00:00Z)
    #[arg(long, value_name = "TIME")]
    at: Option<String>,
    /// Seconds from now after which the task must not start or go on running, more than 0
    /// and at most 2592000 (30 days)
    #[arg(allow_negative_numbers = true, long, value_name = "SECS", value_parser = decimal("seconds", "more than 0 and at most 2592000"))]
    deadline: Option<f64>,
    /// Key that makes a retried submit return the task the first submit created, 1 to 256
    /// bytes
    #[arg(long, value_name = "KEY", conflicts_with_all = ["count", "payloads"])]
    idempotency_key: Option<String>,
    /// Wait until every started task has finished, and print the final records
    #[arg(long)]
    wait: bool,
    /// Give up waiting after this many seconds, counted once for all the started tasks,
    /// from 0 to 2592000 (30 days)
    #[arg(
        allow_negative_numbers = true,
        long,
        value_name = "SECS",
        requires = "wait", value_parser = decimal("seconds", "from 0 to 2592000"))]
    wait_timeout: Option<f64>,
}

#[derive(Args, Debug)]
struct TaskArgs {
    /// Task id (RowKey)
    task_id: String,
    /// Resource id of the task, which makes the lookup cheaper
    #[arg(long, value_name = "ID")]
    resource: Option<String>,
}

#[derive(Args, Debug)]
struct WaitArgs {
    #[command(flatten)]
    task: TaskArgs,
    /// Give up after this many seconds, from 0 to 2592000 (30 days)
    #[arg(allow_negative_numbers = true, long, value_name = "SECS", value_parser = decimal("seconds", "from 0 to 2592000"))]
    timeout: Option<f64>,
}

#[derive(Args, Debug)]
struct ResultArgs {
    #[command(flatten)]
    task: TaskArgs,
    /// Copy the task's output blob to this file
    #[arg(long, value_name = "FILE")]
    output_blob: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct ListArgs {
    /// Only tasks with this status (CREATED, RUNNING, COMPLETED, ERROR, CANCELLED)
    #[arg(long, value_name = "STATUS")]
    status: Option<String>,
    /// Only tasks of this activity type
    #[arg(long = "type", value_name = "TYPE")]
    activity_type: Option<String>,
    /// Only tasks of this resource id
    #[arg(long, value_name = "ID")]
    resource: Option<String>,
    /// Show at most N tasks, 0 or more
    #[arg(
        allow_negative_numbers = true,
        long,
        value_name = "N",
        default_value_t = 100,
        value_parser = whole_number(0, usize::MAX)
    )]
    limit: usize,
}

#[derive(Args, Debug)]
struct PruneArgs {
    /// Delete finished tasks whose EndTime is more than this many days ago, from 0 to 36500
    #[arg(allow_negative_numbers = true, long, value_name = "DAYS", value_parser = decimal("days", "from 0 to 36500"))]
    older_than: f64,
}

#[derive(Args, Debug)]
struct RequeueArgs {
    /// Id of the dead letter, as `bgw dead-letters` shows it
    id: String,
}

/// Returns a parser of a flag's value that accepts a whole number from `min` to `max`, and
/// otherwise fails with a message that gives the range.
fn whole_number<T>(min: T, max: T) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy + Send + Sync + 'static,
{
    move |text: &str| match text.parse::<T>() {
        Ok(value) if min <= value && value <= max => Ok(value),
        _ => Err(format!("it must be a whole number from {min} to {max}")),
    }
}

/// Returns a parser of a decimal number of `unit` whose error, for text that is not a
/// number, names the range that the command checks after parsing.
fn decimal(
    unit: &'static str,
    range: &'static str,
) -> impl Fn(&str) -> Result<f64, String> + Clone + Send + Sync {
    move |text: &str| match text.parse::<f64>() {
        Ok(value) if value.is_finite() => Ok(value),
        _ => Err(format!(
            "it must be a decimal number of {unit}, such as 1.5, {range}"
        )),
    }
}

/// Formats an error and its causes as `{:#}` does, but leaves out a cause whose message
/// the text before it already ends with. The library's errors, such as `Error::Io`, put
/// their source in their own message too, which would print it twice.
fn error_chain(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let message = cause.to_string();
        if text.ends_with(&message) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&message);
    }
    text
}

/// Outcome of a command, besides its output.
enum Finished {
    Done,
    TaskFailed,
}

/// Parses the command line, runs the command and maps the outcome to an exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    commands::init_tracing(matches!(cli.command, Command::Daemon(_)));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: failed to start the async runtime: {error}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    match runtime.block_on(commands::run(cli)) {
        Ok(Finished::Done) => ExitCode::SUCCESS,
        Ok(Finished::TaskFailed) => ExitCode::from(EXIT_TASK_FAILED),
        Err(error) => {
            eprintln!("error: {}", error_chain(&error));
            let usage = error.downcast_ref::<commands::UsageError>().is_some();
            let timed_out = error
                .chain()
                .any(|cause| matches!(cause.downcast_ref(), Some(bgw::Error::TimedOut(_))));
            let code = match (usage, timed_out) {
                (true, _) => EXIT_USAGE,
                (false, true) => EXIT_TIMED_OUT,
                (false, false) => EXIT_FAILURE,
            };
            ExitCode::from(code)
        }
    }
}

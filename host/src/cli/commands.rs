//! The commands behind the CLI.

use std::io::{BufRead, IsTerminal, Read};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bgw::backend::{BlobRef, CancelOutcome, Limits, ListFilter, ReadAt, RetryPolicy};
use bgw::client::{InputBlob, StartOptions, StartRequest, WorkflowClient};
use bgw::config::{Overrides, Settings};
use bgw::daemon::DaemonOptions;
use bgw::record::{Status, TaskRecord};
use bgw::sandbox::{EngineSettings, Sandbox};
use bgw::validate::MAX_PAYLOAD_BYTES;

use super::output::{self, outln};
use super::{
    ActivitiesArgs, Cli, Command, DaemonArgs, Finished, GlobalArgs, ListArgs, PruneArgs,
    RegisterArgs, RequeueArgs, ResultArgs, RollbackArgs, SubmitArgs, TaskArgs, UnregisterArgs,
    WaitArgs, MAX_SUBMIT_COUNT,
};

/// An error in how the command was called, reported with exit code 2.
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// Installs the `tracing` subscriber; `RUST_LOG` overrides the default level.
pub fn init_tracing(daemon: bool) {
    let default = if daemon { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(stderr_is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

/// Runs one parsed command.
pub async fn run(cli: Cli) -> Result<Finished> {
    let settings = resolve_settings(&cli.global)?;
    let json = cli.global.json;
    match cli.command {
        Command::Daemon(args) => daemon(&settings, args).await,
        Command::Register(args) => register(&settings, args, json).await,
        Command::Activities(args) => activities(&settings, args, json).await,
        Command::Rollback(args) => rollback(&settings, args, json).await,
        Command::Unregister(args) => unregister(&settings, args, json).await,
        Command::Submit(args) => submit(&settings, args, json).await,
        Command::Status(args) => status(&settings, args, json).await,
        Command::Wait(args) => wait(&settings, args, json).await,
        Command::Result(args) => result(&settings, args, json).await,
        Command::List(args) => list(&settings, args, json).await,
        Command::Cancel(args) => cancel(&settings, args).await,
        Command::Prune(args) => prune(&settings, args).await,
        Command::DeadLetters => dead_letters(&settings, json).await,
        Command::Requeue(args) => requeue(&settings, args).await,
    }
}

fn resolve_settings(global: &GlobalArgs) -> Result<Settings> {
    let overrides = Overrides {
        data_dir: global.data_dir.clone(),
        config_file: global.config.clone(),
        queue: global.queue.clone(),
        ..Overrides::default()
    };
    // A value that breaks a rule is bad usage, wherever it was set.
    let settings = Settings::resolve(&overrides).map_err(usage_if_invalid)?;
    settings.check_supported().map_err(usage_if_invalid)?;
    Ok(settings)
}

fn client(settings: &Settings) -> Result<WorkflowClient> {
    let backend = bgw::open_backend(settings).context("failed to open the task store")?;
    let client = WorkflowClient::new(backend, settings.db_path().display().to_string());
    Ok(client.with_max_input_blob_bytes(settings.max_input_blob_bytes))
}

/// Returns a client of a store that must exist already, for commands that only read or
/// change tasks.
fn existing_client(settings: &Settings) -> Result<WorkflowClient> {
    let backend = existing_backend(settings)?;
    Ok(WorkflowClient::new(
        backend,
        settings.db_path().display().to_string(),
    ))
}

fn existing_backend(settings: &Settings) -> Result<Arc<dyn bgw::backend::Backend>> {
    bgw::open_existing_backend(settings).context("failed to open the task store")
}

fn sandbox() -> Result<Arc<Sandbox>> {
    Sandbox::new(EngineSettings::default())
}

async fn daemon(settings: &Settings, args: DaemonArgs) -> Result<Finished> {
    let backend = bgw::open_backend(settings).context("failed to open the task store")?;
    let concurrency = args.concurrency.unwrap_or(settings.concurrency);
    if concurrency == 0 {
        return Err(UsageError("invalid --concurrency 0: it must be at least 1".into()).into());
    }
    // One pooled instance per worker slot, as `daemon::run` requires.
    let sandbox = Sandbox::new(EngineSettings {
        pooled_instances: u32::try_from(concurrency).unwrap_or(u32::MAX),
        ..EngineSettings::default()
    })?;
    let mut options = DaemonOptions {
        concurrency,
        shutdown_grace: Duration::from_secs(args.shutdown_grace),
        missing_component_grace: Duration::from_secs(args.missing_component_grace),
        ..DaemonOptions::default()
    };
    let visibility = args
        .visibility_timeout
        .unwrap_or(settings.visibility_timeout.as_secs());
    if visibility == 0 {
        return Err(
            UsageError("invalid visibility timeout 0 s: it must be at least 1 s".into()).into(),
        );
    }
    options.visibility_timeout = Duration::from_secs(visibility);

    bgw::daemon::run(backend, sandbox, options, shutdown_signal()).await?;
    Ok(Finished::Done)
}

/// Resolves on the first SIGTERM or SIGINT. A second one ends the process at once.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate =
        signal(SignalKind::terminate()).expect("failed to install the SIGTERM handler");
    let mut interrupt =
        signal(SignalKind::interrupt()).expect("failed to install the SIGINT handler");
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    tokio::spawn(async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
        tracing::warn!("second signal: stopping at once, running tasks return to the queue when their leases expire");
        std::process::exit(130);
    });
}

async fn register(settings: &Settings, args: RegisterArgs, json: bool) -> Result<Finished> {
    let wasm = read_at_most(&args.file, bgw::registry::MAX_COMPONENT_BYTES, "component")?;

    let defaults = settings.limits;
    let limits = Limits {
        fuel: args.fuel.unwrap_or(defaults.fuel),
        memory_mib: args.memory.unwrap_or(defaults.memory_mib),
        timeout_secs: args.timeout.unwrap_or(defaults.timeout_secs),
        max_output_bytes: args.max_output.unwrap_or(defaults.max_output_bytes),
        retry: RetryPolicy {
            max_attempts: args.max_attempts.unwrap_or(defaults.retry.max_attempts),
            backoff_ms: seconds_to_ms("--backoff", args.backoff)?
                .unwrap_or(defaults.retry.backoff_ms),
            max_backoff_ms: seconds_to_ms("--max-backoff", args.max_backoff)?
                .unwrap_or(defaults.retry.max_backoff_ms),
        },
    };
    bgw::validate::activity_type(&args.activity_type).map_err(usage)?;
    bgw::registry::check_limits(&limits).map_err(usage)?;

    let backend = bgw::open_backend(settings).context("failed to open the task store")?;
    let sandbox = sandbox()?;
    let version = bgw::registry::register(
        backend.registry(),
        &sandbox,
        &args.activity_type,
        &wasm,
        limits,
    )
    .await
    .with_context(|| {
        format!(
            "failed to register {} for activity type {:?}",
            args.file.display(),
            args.activity_type
        )
    })?;

    if json {
        output::print_json(&version)?;
    } else {
        outln!(
            "registered {} version {} digest {}",
            version.activity_type,
            version.version,
            version.digest
        )?;
    }
    Ok(Finished::Done)
}

async fn activities(settings: &Settings, args: ActivitiesArgs, json: bool) -> Result<Finished> {
    let backend = existing_backend(settings)?;
    let mut versions = backend
        .registry()
        .versions(args.activity_type.as_deref())
        .await?;
    if let (Some(activity_type), true) = (&args.activity_type, versions.is_empty()) {
        bail!("activity type {activity_type:?} is not registered: `bgw activities` lists the registered ones");
    }
    if args.activity_type.is_none() {
        versions.retain(|version| version.current);
    }
    if json {
        output::print_json(&versions)?;
    } else {
        output::print_versions(&versions)?;
    }
    if let (Some(activity_type), false) = (&args.activity_type, json) {
        if !versions.iter().any(|version| version.current) {
            outln!(
                "no version of {activity_type} is current: it is unregistered, and \
                 `bgw rollback {activity_type}` makes the last current one current again"
            )?;
        }
    }
    Ok(Finished::Done)
}

async fn rollback(settings: &Settings, args: RollbackArgs, json: bool) -> Result<Finished> {
    let backend = existing_backend(settings)?;
    let version = backend
        .registry()
        .rollback(&args.activity_type)
        .await
        .with_context(|| format!("failed to roll back activity type {:?}", args.activity_type))?;
    if json {
        output::print_json(&version)?;
    } else {
        outln!(
            "{} now runs version {} digest {}",
            version.activity_type,
            version.version,
            version.digest
        )?;
    }
    Ok(Finished::Done)
}

async fn unregister(settings: &Settings, args: UnregisterArgs, json: bool) -> Result<Finished> {
    bgw::validate::activity_type(&args.activity_type).map_err(usage)?;
    let backend = existing_backend(settings)?;
    let version = backend
        .registry()
        .unregister(&args.activity_type)
        .await
        .with_context(|| {
            format!(
                "failed to unregister activity type {:?}",
                args.activity_type
            )
        })?;
    if json {
        output::print_json(&version)?;
    } else {
        outln!(
            "unregistered {}: version {} digest {} is no longer current",
            version.activity_type,
            version.version,
            version.digest
        )?;
        outln!(
            "queued tasks of {0} wait for a component, then end ERROR; `bgw rollback {0}` \
             makes version {1} current again",
            version.activity_type,
            version.version
        )?;
    }
    Ok(Finished::Done)
}

async fn submit(settings: &Settings, args: SubmitArgs, json: bool) -> Result<Finished> {
    bgw::validate::activity_type(&args.activity_type).map_err(usage)?;
    bgw::validate::resource_id(&args.resource).map_err(usage)?;
    if let Some(key) = &args.idempotency_key {
        bgw::validate::idempotency_key(key).map_err(usage)?;
    }
    let payloads = read_payloads(&args)?;
    let wait_timeout = optional_seconds("--wait-timeout", args.wait_timeout)?;
    let options = StartOptions {
        delay: start_delay(&args)?,
        idempotency_key: args.idempotency_key.clone(),
        deadline: match args.deadline {
            Some(secs) if !(secs.is_finite() && secs > 0.0 && secs <= 30.0 * 86400.0) => {
                return Err(UsageError(format!(
                    "invalid --deadline {secs}: it must be more than 0 and at most 2592000 seconds"
                ))
                .into())
            }
            Some(secs) => Some(bgw::record::truncate_to_micros(
                chrono::Utc::now()
                    + chrono::Duration::from_std(Duration::from_secs_f64(secs))
                        .expect("bounded above"),
            )),
            None => None,
        },
    };
    let deadline_first = args
        .deadline
        .filter(|secs| Duration::from_secs_f64(*secs) <= options.delay);
    if let Some(secs) = deadline_first {
        return Err(UsageError(format!(
            "invalid --deadline {secs}: the task may not start until {:.3} s from now \
             (--delay or --at), so a deadline before then would end it without a run",
            options.delay.as_secs_f64()
        ))
        .into());
    }
    if let Some(path) = &args.blob {
        // Fails before any task starts. Each task opens the file again to store its blob.
        let file = std::fs::File::open(path)
            .with_context(|| format!("failed to open blob file {}", path.display()))?;
        // Opening a directory succeeds on Linux, and only the first read fails.
        if file.metadata().is_ok_and(|metadata| metadata.is_dir()) {
            bail!(
                "failed to read blob file {}: it is a directory, not a file",
                path.display()
            );
        }
        // A regular file that is too large fails here, before anything is copied. The
        // client checks the size again while it copies, which also covers pipes and
        // devices, whose size is unknown.
        let limit = settings.max_input_blob_bytes;
        if let Ok(metadata) = file.metadata() {
            if metadata.is_file() && metadata.len() > limit {
                return Err(UsageError(format!(
                    "blob file {} is {} bytes, over the input blob limit of {limit} bytes \
                     (submit.max_input_blob_bytes in bgw.toml sets the limit); no task was \
                     started",
                    path.display(),
                    metadata.len()
                ))
                .into());
            }
        }
    }
    let client = client(settings)?;

    // An idempotency key may return a task of another resource, so look such tasks up by
    // id alone.
    let lookup_resource = match args.idempotency_key {
        Some(_) => None,
        None => Some(args.resource.as_str()),
    };
    let total = payloads.count();
    let bulk = total > 1;
    let bar = output::progress_bar(bulk, total, "submitting");
    let started = match bulk {
        true => submit_in_chunks(&client, &args, &payloads, &options, &bar).await,
        false => submit_one(&client, &args, payloads.get(0), &options)
            .await
            .map(|task_id| vec![task_id])
            .map_err(|error| (Vec::new(), error)),
    };
    let task_ids = match started {
        Ok(task_ids) => task_ids,
        Err((task_ids, error)) => {
            bar.finish_and_clear();
            if let Some(conflict @ bgw::Error::IdempotencyConflict { .. }) =
                error.downcast_ref::<bgw::Error>()
            {
                return Err(UsageError(conflict.to_string()).into());
            }
            // An invalid value that the checks above cannot see, such as an input blob
            // over the limit, is bad usage too.
            let invalid_input = matches!(
                error.downcast_ref::<bgw::Error>(),
                Some(bgw::Error::Invalid(_))
            );
            for task_id in &task_ids {
                // Report the submit error even when stdout fails.
                let _ = outln!("{task_id}");
            }
            let mut context = format!(
                "failed to submit task {} of {total} of type {:?}",
                task_ids.len() + 1,
                args.activity_type
            );
            if !task_ids.is_empty() {
                context.push_str(&format!(
                    " ({} started, their ids are printed above)",
                    task_ids.len()
                ));
            }
            if invalid_input {
                return Err(UsageError(format!("{context}: {error}")).into());
            }
            return Err(error.context(context));
        }
    };
    bar.finish_and_clear();
    warn_if_unregistered(&client, &args.activity_type, task_ids.len()).await;

    if !args.wait {
        if json {
            let mut records = Vec::new();
            for task_id in &task_ids {
                if let Some(record) = client.get_task(task_id, lookup_resource).await? {
                    records.push(record);
                }
            }
            if bulk {
                output::print_json(&records)?;
            } else if let Some(record) = records.first() {
                output::print_json(record)?;
            }
        } else {
            for task_id in &task_ids {
                outln!("{task_id}")?;
            }
        }
        return Ok(Finished::Done);
    }

    // One timeout covers all the started tasks. The first wait gets all of it and each
    // later one the time left, and a task that already finished is still seen when no time
    // is left.
    let waiting_since = std::time::Instant::now();
    let bar = output::progress_bar(true, task_ids.len() as u64, "waiting");
    let mut records = Vec::with_capacity(task_ids.len());
    for (index, task_id) in task_ids.iter().enumerate() {
        let timeout = match index {
            0 => wait_timeout,
            _ => wait_timeout.map(|total| total.saturating_sub(waiting_since.elapsed())),
        };
        let record = client
            .wait(task_id, lookup_resource, timeout)
            .await
            .map_err(|error| {
                let within = wait_timeout.map_or(String::new(), |total| {
                    format!(" within the --wait-timeout of {} s", total.as_secs_f64())
                });
                let unseen = format!(
                    "{} of {} started tasks not seen finished{within}; `bgw list --resource {}` \
                     lists them all",
                    task_ids.len() - index,
                    task_ids.len(),
                    args.resource
                );
                // A timeout's message names the task already.
                let context = match (&error, bulk) {
                    (bgw::Error::TimedOut(_), false) => return anyhow::Error::from(error),
                    (bgw::Error::TimedOut(_), true) => unseen,
                    (_, false) => format!("failed to wait for task {task_id}"),
                    (_, true) => format!("failed to wait for task {task_id} ({unseen})"),
                };
                anyhow::Error::from(error).context(context)
            })?;
        bar.inc(1);
        records.push(record);
    }
    bar.finish_and_clear();
    let failed = records
        .iter()
        .any(|record| record.status != Status::Completed);
    if json {
        if bulk {
            output::print_json(&records)?;
        } else {
            output::print_json(&records[0])?;
        }
    } else if bulk {
        for record in &records {
            outln!("{}  {}", record.row_key, record.status)?;
        }
        output::print_summary(&records)?;
    } else {
        output::print_record(&records[0])?;
    }
    Ok(if failed {
        Finished::TaskFailed
    } else {
        Finished::Done
    })
}

/// Warns on stderr when the activity type has no current component. Such tasks are valid,
/// because a component may be registered next, but they end ERROR if none is.
async fn warn_if_unregistered(client: &WorkflowClient, activity_type: &str, tasks: usize) {
    match client.backend().registry().current(activity_type).await {
        Ok(Some(_)) => {}
        Ok(None) => {
            let (waits, ends) = match tasks {
                1 => ("the task waits", "ends"),
                _ => ("the tasks wait", "end"),
            };
            eprintln!(
                "warning: no component is registered for activity type {activity_type:?}: \
                 {waits} up to the daemon's --missing-component-grace (30 s by default) for \
                 `bgw register {activity_type} FILE.wasm`, then {ends} ERROR"
            );
        }
        Err(error) => {
            tracing::debug!(%error, activity_type, "failed to read the current component");
        }
    }
}

/// Returns the start delay set by `--delay` or `--at`.
fn start_delay(args: &SubmitArgs) -> Result<Duration> {
    const MAX_DELAY_SECS: f64 = 30.0 * 86400.0;
    if let Some(at) = &args.at {
        let time = bgw::record::parse_time(at)
            .map_err(|error| UsageError(format!("invalid --at: {error}")))?;
        let delay = (time - chrono::Utc::now())
            .to_std()
            .unwrap_or(Duration::ZERO);
        if delay.as_secs_f64() > MAX_DELAY_SECS {
            return Err(
                UsageError(format!("invalid --at {at}: it is more than 30 days ahead")).into(),
            );
        }
        return Ok(delay);
    }
    match args.delay {
        Some(secs) if !(secs.is_finite() && (0.0..=MAX_DELAY_SECS).contains(&secs)) => {
            Err(UsageError(format!(
                "invalid --delay {secs}: it must be between 0 and 2592000 seconds"
            ))
            .into())
        }
        Some(secs) => Ok(Duration::from_secs_f64(secs)),
        None => Ok(Duration::ZERO),
    }
}

/// Converts an optional number of seconds from the command line to milliseconds.
fn seconds_to_ms(flag: &str, seconds: Option<f64>) -> Result<Option<u64>> {
    match seconds {
        None => Ok(None),
        Some(value) if value.is_finite() && (0.0..=86_400.0).contains(&value) => {
            Ok(Some((value * 1000.0).round() as u64))
        }
        Some(value) => Err(UsageError(format!(
            "invalid {flag} {value}: it must be between 0 and 86400 seconds"
        ))
        .into()),
    }
}

/// The payloads of one `bgw submit`: one payload repeated, or the lines of a file.
/// Number of tasks that `bgw submit` passes to one `start_activities` call, so the
/// progress bar moves and at most this many blob files are open at once.
const SUBMIT_CHUNK: u64 = 1_000;

/// Starts the one task of a `bgw submit` without `--count` or `--payloads`.
async fn submit_one(
    client: &WorkflowClient,
    args: &SubmitArgs,
    payload: &[u8],
    options: &StartOptions,
) -> Result<String> {
    let mut file;
    let blob = match &args.blob {
        Some(path) => {
            file = std::fs::File::open(path)
                .with_context(|| format!("failed to open blob file {}", path.display()))?;
            Some(InputBlob {
                container: None,
                name: None,
                data: &mut file,
            })
        }
        None => None,
    };
    let task_id = client
        .start_activity_with(&args.activity_type, &args.resource, payload, blob, options)
        .await?;
    Ok(task_id)
}

/// Starts every task of a `bgw submit --count` or `--payloads` with
/// `WorkflowClient::start_activities`, [`SUBMIT_CHUNK`] at a time. On failure, returns the
/// error together with the ids of the tasks that were started.
async fn submit_in_chunks(
    client: &WorkflowClient,
    args: &SubmitArgs,
    payloads: &Payloads,
    options: &StartOptions,
    bar: &indicatif::ProgressBar,
) -> std::result::Result<Vec<String>, (Vec<String>, anyhow::Error)> {
    let total = payloads.count();
    let mut task_ids = Vec::with_capacity(total as usize);
    for first in (0..total).step_by(SUBMIT_CHUNK as usize) {
        let end = (first + SUBMIT_CHUNK).min(total);
        let mut files: Vec<BlobFile> = match &args.blob {
            Some(path) => (first..end).map(|_| BlobFile::new(path)).collect(),
            None => Vec::new(),
        };
        let mut files = files.iter_mut();
        let requests = (first..end)
            .map(|index| StartRequest {
                activity_type: &args.activity_type,
                resource_id: &args.resource,
                payload_json: payloads.get(index),
                blob: files.next().map(|file| InputBlob {
                    container: None,
                    name: None,
                    data: file,
                }),
                options: options.clone(),
            })
            .collect();
        match client.start_activities(requests).await {
            Ok(started) => task_ids.extend(started),
            Err(bgw::Error::PartlySubmitted {
                task_ids: started,
                source,
                ..
            }) => {
                task_ids.extend(started);
                return Err((task_ids, anyhow::Error::from(*source)));
            }
            Err(error) => return Err((task_ids, error.into())),
        }
        bar.inc(end - first);
    }
    Ok(task_ids)
}

/// The `--blob` file of one task, opened when its blob is stored and closed at its end.
struct BlobFile<'a> {
    path: &'a Path,
    file: Option<std::fs::File>,
    finished: bool,
}

impl<'a> BlobFile<'a> {
    fn new(path: &'a Path) -> Self {
        BlobFile {
            path,
            file: None,
            finished: false,
        }
    }
}

impl std::io::Read for BlobFile<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.finished {
            return Ok(0);
        }
        let file = match &mut self.file {
            Some(file) => file,
            None => self.file.insert(std::fs::File::open(self.path)?),
        };
        let read = file.read(buf)?;
        if read == 0 && !buf.is_empty() {
            self.file = None;
            self.finished = true;
        }
        Ok(read)
    }
}

enum Payloads {
    Repeated { payload: Vec<u8>, count: u64 },
    Lines(Vec<Vec<u8>>),
}

impl Payloads {
    fn count(&self) -> u64 {
        match self {
            Payloads::Repeated { count, .. } => *count,
            Payloads::Lines(lines) => lines.len() as u64,
        }
    }

    fn get(&self, index: u64) -> &[u8] {
        match self {
            Payloads::Repeated { payload, .. } => payload,
            Payloads::Lines(lines) => &lines[index as usize],
        }
    }
}

/// Reads a whole file of at most `limit` bytes. The read stops one byte past the limit,
/// so a huge or endless file such as `/dev/zero` fails at once instead of filling memory.
fn read_at_most(path: &Path, limit: usize, label: &str) -> Result<Vec<u8>> {
    let failed = || format!("failed to read {label} {}", path.display());
    let file = std::fs::File::open(path).with_context(failed)?;
    let mut bytes = Vec::new();
    file.take(limit as u64 + 1)
        .read_to_end(&mut bytes)
        .with_context(failed)?;
    if bytes.len() > limit {
        return Err(UsageError(format!(
            "{label} {} is larger than the maximum of {limit} bytes ({} MiB)",
            path.display(),
            limit / (1024 * 1024)
        ))
        .into());
    }
    Ok(bytes)
}

/// Maximum bytes that `submit --payloads` reads from its file. Every payload is kept in
/// memory until all have been checked, so the file as a whole needs a limit too.
const MAX_PAYLOADS_FILE_BYTES: u64 = 1024 * 1024 * 1024;

/// Reads a file of payloads, one JSON object per line, and checks each. Lines are read one
/// at a time, and none may pass the payload limit, so an endless line fails at once. The
/// file may have at most `max_total` bytes in all.
fn read_payload_lines(path: &Path, max_total: u64) -> Result<Vec<Vec<u8>>> {
    let failed = || format!("failed to read payload file {}", path.display());
    let file = std::fs::File::open(path).with_context(failed)?;
    let mut reader = std::io::BufReader::new(file);
    let mut lines = Vec::new();
    let mut number = 0u64;
    let mut total = 0u64;
    loop {
        let mut line = Vec::new();
        let read = (&mut reader)
            .take(MAX_PAYLOAD_BYTES as u64 + 2)
            .read_until(b'\n', &mut line)
            .with_context(failed)?;
        if read == 0 {
            return Ok(lines);
        }
        total += read as u64;
        if total > max_total {
            return Err(UsageError(format!(
                "payload file {} is larger than the maximum of {max_total} bytes; split it \
                 over several submits; no task was started",
                path.display()
            ))
            .into());
        }
        number += 1;
        if line.last() == Some(&b'\n') {
            line.pop();
        } else if line.len() > MAX_PAYLOAD_BYTES {
            return Err(UsageError(format!(
                "invalid payload on line {number} of {}: it is longer than the maximum of \
                 {MAX_PAYLOAD_BYTES} bytes (1 MiB); no task was started",
                path.display()
            ))
            .into());
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        bgw::validate::payload(&line).map_err(|error| {
            UsageError(format!(
                "invalid payload on line {number} of {}: {error}; no task was started",
                path.display()
            ))
        })?;
        if lines.len() as u64 == MAX_SUBMIT_COUNT {
            return Err(UsageError(format!(
                "payload file {} has more than {MAX_SUBMIT_COUNT} payloads, the most one \
                 submit starts; no task was started",
                path.display()
            ))
            .into());
        }
        lines.push(line);
    }
}

/// Reads the payloads and checks every one before any task is started.
fn read_payloads(args: &SubmitArgs) -> Result<Payloads> {
    if let Some(path) = &args.payloads {
        let lines = read_payload_lines(path, MAX_PAYLOADS_FILE_BYTES)?;
        if lines.is_empty() {
            return Err(
                UsageError(format!("payload file {} has no payloads", path.display())).into(),
            );
        }
        return Ok(Payloads::Lines(lines));
    }
    let payload = match args.payload.strip_prefix('@') {
        Some(path) => read_at_most(Path::new(path), MAX_PAYLOAD_BYTES, "payload file")?,
        None => args.payload.clone().into_bytes(),
    };
    bgw::validate::payload(&payload).map_err(usage)?;
    Ok(Payloads::Repeated {
        payload,
        count: args.count,
    })
}

/// Turns a validation error of a command-line value into a usage error (exit code 2).
fn usage(error: bgw::Error) -> UsageError {
    UsageError(error.to_string())
}

/// Turns an [`bgw::Error::Invalid`] into a usage error, and keeps any other error.
fn usage_if_invalid(error: bgw::Error) -> anyhow::Error {
    match error {
        bgw::Error::Invalid(_) => usage(error).into(),
        other => other.into(),
    }
}

/// Converts an optional number of seconds to a duration, rejecting negative, NaN and huge
/// values.
fn optional_seconds(flag: &str, seconds: Option<f64>) -> Result<Option<Duration>> {
    match seconds {
        None => Ok(None),
        Some(value) if value.is_finite() && (0.0..=30.0 * 86_400.0).contains(&value) => {
            Ok(Some(Duration::from_secs_f64(value)))
        }
        Some(value) => Err(UsageError(format!(
            "invalid {flag} {value}: it must be between 0 and 2592000 seconds"
        ))
        .into()),
    }
}

async fn find_task(client: &WorkflowClient, args: &TaskArgs) -> Result<TaskRecord> {
    bgw::validate::task_id(&args.task_id).map_err(usage)?;
    client
        .get_task(&args.task_id, args.resource.as_deref())
        .await?
        .with_context(|| bgw::client::task_not_found(&args.task_id, args.resource.as_deref()))
}

async fn status(settings: &Settings, args: TaskArgs, json: bool) -> Result<Finished> {
    let client = existing_client(settings)?;
    let record = find_task(&client, &args).await?;
    if json {
        output::print_json(&record)?;
    } else {
        output::print_record(&record)?;
    }
    Ok(Finished::Done)
}

async fn wait(settings: &Settings, args: WaitArgs, json: bool) -> Result<Finished> {
    let client = existing_client(settings)?;
    bgw::validate::task_id(&args.task.task_id).map_err(usage)?;
    let timeout = optional_seconds("--timeout", args.timeout)?;
    let record = client
        .wait(&args.task.task_id, args.task.resource.as_deref(), timeout)
        .await?;
    if json {
        output::print_json(&record)?;
    } else {
        output::print_record(&record)?;
    }
    Ok(if record.status == Status::Completed {
        Finished::Done
    } else {
        Finished::TaskFailed
    })
}

async fn result(settings: &Settings, args: ResultArgs, json: bool) -> Result<Finished> {
    let client = existing_client(settings)?;
    let record = find_task(&client, &args.task).await?;
    match record.status {
        Status::Completed => {
            if json {
                let value: serde_json::Value = serde_json::from_str(&record.output_payload)
                    .with_context(|| {
                        format!("task {} has an invalid OutputPayload", record.row_key)
                    })?;
                output::print_json(&value)?;
            } else {
                outln!("{}", record.output_payload)?;
            }
            if let Some(target) = &args.output_blob {
                save_output_blob(&client, &record, target)?;
            }
            Ok(Finished::Done)
        }
        Status::Error | Status::Cancelled => {
            eprintln!(
                "task {} ended {}: {}",
                record.row_key,
                record.status,
                record
                    .error_message
                    .as_deref()
                    .unwrap_or("no error message")
            );
            Ok(Finished::TaskFailed)
        }
        Status::Created | Status::Running => {
            bail!(
                "task {0} has no result yet, it is {1}: `bgw wait {0}` waits until it finishes",
                record.row_key,
                record.status
            )
        }
    }
}

/// Copies a completed task's output blob to `target` as a stream.
fn save_output_blob(client: &WorkflowClient, record: &TaskRecord, target: &Path) -> Result<()> {
    let (Some(container), Some(name)) = (&record.output_container_name, &record.output_blob_name)
    else {
        bail!(
            "task {} has no output blob, so nothing was saved to {}",
            record.row_key,
            target.display()
        );
    };
    let blob = BlobRef {
        container: container.clone(),
        name: name.clone(),
    };
    let (reader, size) = client.backend().blobs().open(&blob)?;
    let mut source = BlobReader { reader, offset: 0 };
    let mut file = std::fs::File::create(target)
        .with_context(|| format!("failed to create {}", target.display()))?;
    let copied = std::io::copy(&mut source, &mut file).with_context(|| {
        format!(
            "failed to copy output blob {container}/{name} ({size} bytes) to {}",
            target.display()
        )
    })?;
    eprintln!("saved output blob ({copied} bytes) to {}", target.display());
    Ok(())
}

/// A blob read from its start, one `read_at` after the other.
struct BlobReader {
    reader: Box<dyn ReadAt>,
    offset: u64,
}

impl std::io::Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let read = self.reader.read_at(self.offset, buf)?;
        self.offset += read as u64;
        Ok(read)
    }
}

async fn list(settings: &Settings, args: ListArgs, json: bool) -> Result<Finished> {
    let status = match &args.status {
        Some(text) => Some(text.parse::<Status>().map_err(UsageError)?),
        None => None,
    };
    let filter = ListFilter {
        status,
        task_type: args.activity_type.clone(),
        resource_id: args.resource.clone(),
        limit: Some(args.limit),
    };
    let records = existing_client(settings)?.list(&filter).await?;
    if json {
        output::print_json(&records)?;
    } else {
        output::print_table(&records)?;
    }
    Ok(Finished::Done)
}

async fn cancel(settings: &Settings, args: TaskArgs) -> Result<Finished> {
    bgw::validate::task_id(&args.task_id).map_err(usage)?;
    let client = existing_client(settings)?;
    match client
        .cancel(&args.task_id, args.resource.as_deref())
        .await?
    {
        CancelOutcome::Cancelled => outln!("cancelled {}: it will not start", args.task_id)?,
        CancelOutcome::Requested => outln!(
            "cancellation requested for {}: its daemon stops it (`bgw wait` shows the end)",
            args.task_id
        )?,
        CancelOutcome::AlreadyFinished(status) => {
            bail!(
                "task {} already finished with status {status}",
                args.task_id
            )
        }
        CancelOutcome::NotFound => bail!(bgw::client::task_not_found(
            &args.task_id,
            args.resource.as_deref()
        )),
    }
    Ok(Finished::Done)
}

async fn prune(settings: &Settings, args: PruneArgs) -> Result<Finished> {
    const BATCH: usize = 1000;
    if !(args.older_than.is_finite() && args.older_than >= 0.0 && args.older_than <= 36_500.0) {
        return Err(UsageError(format!(
            "invalid --older-than {}: it must be between 0 and 36500 days",
            args.older_than
        ))
        .into());
    }
    let age = chrono::Duration::milliseconds((args.older_than * 86_400_000.0) as i64);
    // In whole microseconds, as the times `bgw` writes, so that the cutoff prints and
    // compares with six fractional digits.
    let before = bgw::record::now() - age;
    let backend = existing_backend(settings)?;
    let mut pruned = 0usize;
    loop {
        let records = backend.prune_finished(before, BATCH).await?;
        for record in &records {
            let blobs = [
                (&record.container_name, &record.blob_name),
                (&record.output_container_name, &record.output_blob_name),
            ];
            for (container, name) in blobs {
                // Only blobs named after the task are its own; a blob a client named may
                // be shared with other tasks.
                let own = name
                    .as_deref()
                    .is_some_and(|name| name.starts_with(&format!("{}/", record.row_key)));
                if let (Some(container), Some(name), true) = (container, name, own) {
                    let blob = BlobRef {
                        container: container.clone(),
                        name: name.clone(),
                    };
                    if let Err(error) = backend.blobs().delete(&blob) {
                        eprintln!("warning: failed to delete blob {container}/{name}: {error}");
                    }
                }
            }
        }
        pruned += records.len();
        if records.len() < BATCH {
            break;
        }
    }
    outln!(
        "pruned {pruned} finished tasks that ended before {}",
        bgw::record::format_time(&before)
    )?;
    Ok(Finished::Done)
}

async fn dead_letters(settings: &Settings, json: bool) -> Result<Finished> {
    let backend = existing_backend(settings)?;
    let letters = backend.list_dead_letters().await?;
    if json {
        output::print_json(&letters)?;
    } else {
        for letter in &letters {
            outln!(
                "{}  {}  dequeued {}x  task {}  {}",
                letter.id,
                bgw::record::format_time(&letter.dead_lettered_at),
                letter.dequeue_count,
                letter.row_key.as_deref().unwrap_or("-"),
                letter.reason
            )?;
        }
    }
    Ok(Finished::Done)
}

async fn requeue(settings: &Settings, args: RequeueArgs) -> Result<Finished> {
    let backend = existing_backend(settings)?;
    let requeued = backend
        .requeue_dead_letter(&args.id)
        .await
        .map_err(usage_if_invalid)?;
    if !requeued {
        bail!(
            "dead letter {:?} not found: `bgw dead-letters` lists them",
            args.id
        );
    }
    outln!("requeued {}", args.id)?;
    Ok(Finished::Done)
}

/// Returns true when stderr is a terminal, where progress bars are drawn.
pub fn stderr_is_terminal() -> bool {
    std::io::stderr().is_terminal()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_file_stops_at_total_limit() {
        let dir = std::env::temp_dir().join(format!("bgw-payloads-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("payloads.jsonl");
        let line = "{\"x\": 1}\n";
        std::fs::write(&path, line.repeat(10)).unwrap();

        let all = read_payload_lines(&path, 10 * line.len() as u64).unwrap();
        assert_eq!(all.len(), 10);
        assert_eq!(all[0], b"{\"x\": 1}");

        let error = read_payload_lines(&path, 9 * line.len() as u64).unwrap_err();
        let message = error.to_string();
        assert!(
            message.contains(&format!(
                "is larger than the maximum of {} bytes",
                9 * line.len()
            )),
            "{message}"
        );
        assert!(error.downcast_ref::<UsageError>().is_some(), "{message}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

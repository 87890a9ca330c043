//! Submit-to-COMPLETED latency at a fixed offered load, seen from a client process.
//!
//! One thread submits on an open-loop schedule (task `i` at `start + i / rate`); another
//! polls the oldest unfinished tasks with `WorkflowClient::get_task`. Latency runs from
//! the scheduled submit time to the poll that first reads a terminal record, so a submitter
//! that falls behind adds to the latency instead of hiding it, and the poll interval
//! rounds each figure up by up to `POLL` plus one read.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bgw::client::WorkflowClient;
use bgw::record::{Status, TaskRecord};
use serde_json::{json, Value};

use crate::stats::summarize;
use crate::StoreArgs;

#[derive(clap::Args, Debug)]
pub struct LatencyArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Offered load, in tasks per second
    #[arg(long, value_name = "TASKS_PER_SEC")]
    rate: f64,
    /// Seconds of submission
    #[arg(long, value_name = "SECS", default_value_t = 5.0)]
    seconds: f64,
    /// File to write every latency to, one value in milliseconds per line
    #[arg(long, value_name = "FILE")]
    samples: Option<PathBuf>,
}

/// Interval between two polls of the oldest unfinished tasks.
pub const POLL: Duration = Duration::from_micros(200);

/// Unfinished tasks, oldest first, read in each poll: enough for tasks that finish a
/// little out of order at concurrency 2 to be seen on time.
const POLL_WINDOW: usize = 8;

/// Time to wait for the last tasks after the submission ends.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);

/// A task seen in a terminal status.
pub struct Observed {
    pub latency: Duration,
    pub record: TaskRecord,
}

/// Tasks and timing of one paced run.
pub struct PacedRun {
    pub submitted: usize,
    pub observed: Vec<Observed>,
    pub unfinished: usize,
    /// Largest delay of a submit behind its schedule.
    pub max_submit_lag: Duration,
}

pub fn run(args: LatencyArgs) -> anyhow::Result<Value> {
    let client = crate::open_client(&args.store.data_dir)?;
    let paced = paced_run(
        &client,
        &args.store.resource,
        args.rate,
        args.seconds,
        |_| {},
    )?;

    let millis: Vec<f64> = paced
        .observed
        .iter()
        .map(|observed| observed.latency.as_secs_f64() * 1e3)
        .collect();
    if let Some(path) = &args.samples {
        let lines: Vec<String> = millis.iter().map(|value| format!("{value:.4}")).collect();
        std::fs::write(path, lines.join("\n") + "\n")
            .with_context(|| format!("failed to write {}", path.display()))?;
    }
    let failed = paced
        .observed
        .iter()
        .filter(|observed| observed.record.status != Status::Completed)
        .count();
    let summary = summarize(&millis);
    Ok(json!({
        "rate": args.rate,
        "submitted": paced.submitted,
        "observed": paced.observed.len(),
        "failed": failed,
        "unfinished": paced.unfinished,
        "p50_ms": summary.p50,
        "p99_ms": summary.p99,
        "max_ms": summary.max,
        "max_submit_lag_ms": paced.max_submit_lag.as_secs_f64() * 1e3,
    }))
}

/// Submits `rate` tasks a second for `seconds` and polls each to a terminal status.
/// `on_tick` runs in the submitting thread before each submit, with the time since the
/// start.
pub fn paced_run(
    client: &WorkflowClient,
    resource: &str,
    rate: f64,
    seconds: f64,
    mut on_tick: impl FnMut(Duration) + Send,
) -> anyhow::Result<PacedRun> {
    let total = (rate * seconds).round() as usize;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let (sender, receiver) = mpsc::channel::<(String, Instant)>();

    std::thread::scope(|scope| {
        let poller = scope.spawn(|| poll_until_finished(client, resource, receiver));

        let submitter = scope.spawn(move || -> anyhow::Result<(usize, Duration)> {
            let runtime = crate::runtime()?;
            let start = Instant::now();
            let mut max_lag = Duration::ZERO;
            for index in 0..total {
                let scheduled = start + interval * index as u32;
                let now = Instant::now();
                if scheduled > now {
                    std::thread::sleep(scheduled - now);
                } else {
                    max_lag = max_lag.max(now - scheduled);
                }
                on_tick(scheduled - start);
                let task_id = runtime
                    .block_on(client.start_activity("multiply", resource, br#"{"x":21}"#, None))
                    .context("failed to submit a task")?;
                if sender.send((task_id, scheduled)).is_err() {
                    anyhow::bail!("the poller stopped early");
                }
            }
            Ok((total, max_lag))
        });

        let (submitted, max_submit_lag) = submitter
            .join()
            .map_err(|_| anyhow::anyhow!("the submitter panicked"))??;
        let (observed, unfinished) = poller
            .join()
            .map_err(|_| anyhow::anyhow!("the poller panicked"))??;
        Ok(PacedRun {
            submitted,
            observed,
            unfinished,
            max_submit_lag,
        })
    })
}

/// Polls the oldest unfinished tasks until the sender is gone and every task is terminal,
/// or `DRAIN_TIMEOUT` after the sender is gone. Returns the observed tasks and the number
/// still unfinished.
fn poll_until_finished(
    client: &WorkflowClient,
    resource: &str,
    receiver: mpsc::Receiver<(String, Instant)>,
) -> anyhow::Result<(Vec<Observed>, usize)> {
    let runtime = crate::runtime()?;
    let mut pending: VecDeque<(String, Instant)> = VecDeque::new();
    let mut observed = Vec::new();
    let mut sender_gone_at: Option<Instant> = None;
    loop {
        loop {
            match receiver.try_recv() {
                Ok(task) => pending.push_back(task),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    sender_gone_at.get_or_insert_with(Instant::now);
                    break;
                }
            }
        }

        let mut index = 0;
        while index < pending.len().min(POLL_WINDOW) {
            let (task_id, scheduled) = &pending[index];
            let record = runtime
                .block_on(client.get_task(task_id, Some(resource)))
                .with_context(|| format!("failed to read task {task_id}"))?;
            match record {
                Some(record) if record.status.is_terminal() => {
                    observed.push(Observed {
                        latency: scheduled.elapsed(),
                        record,
                    });
                    pending.remove(index);
                }
                _ => index += 1,
            }
        }

        if let Some(gone) = sender_gone_at {
            if pending.is_empty() || gone.elapsed() > DRAIN_TIMEOUT {
                return Ok((observed, pending.len()));
            }
        }
        std::thread::sleep(POLL);
    }
}

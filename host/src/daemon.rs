//! The controller: leases messages, runs each task in the sandbox and records the outcome.
//!
//! One leasing loop fills free worker slots. Each leased message becomes a worker task
//! that checks the record, marks it RUNNING, keeps its lease alive while the guest runs,
//! and hands the terminal record to the finisher, which commits outcomes in batches
//! (one transaction per batch on SQLite).

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::backend::{AttemptStart, Backend, BlobRef, Fenced, Finish, Lease, ProgressUpdate};
use crate::record::{QueueMessage, Status, TaskRecord};
use crate::registry::{ComponentCache, LoadedComponent};
use crate::sandbox::{Outcome, Sandbox, TaskContext, TaskError};
use crate::{validate, Result};

/// Container that guests' output blobs are stored in.
pub const OUTPUT_CONTAINER: &str = "bgw-output";

/// Default number of deliveries after which a message is dead-lettered.
pub const DEFAULT_MAX_DELIVERIES: u32 = 5;

/// Largest number of terminal records committed in one batch.
const MAX_FINISH_BATCH: usize = 256;

/// How the daemon runs.
#[derive(Clone, Debug)]
pub struct DaemonOptions {
    /// Tasks run at once.
    pub concurrency: usize,
    /// How long a leased message stays invisible before another worker may take it.
    /// Running tasks extend it every third of this period.
    pub visibility_timeout: Duration,
    /// Longest pause between looks at an empty queue.
    pub idle_poll: Duration,
    /// Interval between checks of the registry for new component versions.
    pub registry_poll: Duration,
    /// Time running tasks get to finish after a shutdown signal.
    pub shutdown_grace: Duration,
    /// Name of this host, stored in each record it runs.
    pub host_id: String,
    /// Deliveries after which a message is dead-lettered instead of run again, so a
    /// message that crashes its worker every time cannot loop forever.
    pub max_deliveries: u32,
}

impl Default for DaemonOptions {
    fn default() -> Self {
        DaemonOptions {
            concurrency: std::thread::available_parallelism().map_or(2, |n| n.get()),
            visibility_timeout: Duration::from_secs(30),
            idle_poll: Duration::from_millis(50),
            registry_poll: Duration::from_millis(50),
            shutdown_grace: Duration::from_secs(30),
            host_id: default_host_id(),
            max_deliveries: DEFAULT_MAX_DELIVERIES,
        }
    }
}

/// Returns `HOSTNAME:PID`, which tells hosts and restarts apart in task records.
pub fn default_host_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .unwrap_or_else(|_| "localhost".to_owned());
    format!("{host}:{}", std::process::id())
}

/// Shared state of the workers.
struct Controller {
    backend: Arc<dyn Backend>,
    sandbox: Arc<Sandbox>,
    components: Arc<ComponentCache>,
    options: DaemonOptions,
    /// Cancelled when the grace period after a shutdown signal is over: running attempts
    /// stop and their messages are released for other workers.
    interrupt: CancellationToken,
    finisher: mpsc::Sender<(Finish, oneshot::Sender<Result<Fenced>>)>,
}

/// Runs the daemon until `shutdown` resolves, then lets running tasks finish within the
/// grace period. Tasks still running after it are stopped and their messages released at
/// once, so another worker can run them.
pub async fn run(
    backend: Arc<dyn Backend>,
    sandbox: Arc<Sandbox>,
    options: DaemonOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let components = Arc::new(ComponentCache::new(sandbox.clone(), backend.clone()));
    components.refresh().await?;

    let (finish_tx, finish_rx) = mpsc::channel(MAX_FINISH_BATCH * 4);
    let finisher = tokio::spawn(run_finisher(backend.clone(), finish_rx));
    let watcher = tokio::spawn(watch_registry(components.clone(), options.registry_poll));

    let controller = Arc::new(Controller {
        backend: backend.clone(),
        sandbox,
        components,
        options: options.clone(),
        interrupt: CancellationToken::new(),
        finisher: finish_tx,
    });
    tracing::info!(
        concurrency = options.concurrency,
        host_id = %options.host_id,
        "daemon started"
    );

    let slots = Arc::new(Semaphore::new(options.concurrency.max(1)));
    let mut workers = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        while workers.try_join_next().is_some() {}

        let permit = tokio::select! {
            _ = &mut shutdown => break,
            permit = slots.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        let free = slots.available_permits() + 1;
        let leases = match backend.lease(free, options.visibility_timeout).await {
            Ok(leases) => leases,
            Err(error) => {
                tracing::error!(%error, "failed to lease messages, retrying in 1 s");
                drop(permit);
                tokio::select! {
                    _ = &mut shutdown => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        if leases.is_empty() {
            drop(permit);
            tokio::select! {
                _ = &mut shutdown => break,
                _ = backend.wait_for_change(options.idle_poll) => continue,
            }
        }

        let mut permit = Some(permit);
        for lease in leases {
            let slot = match permit.take() {
                Some(slot) => slot,
                None => slots
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("the semaphore is never closed"),
            };
            let controller = controller.clone();
            workers.spawn(async move {
                controller.process(lease).await;
                drop(slot);
            });
        }
    }

    tracing::info!(
        running = workers.len(),
        grace_secs = options.shutdown_grace.as_secs_f64(),
        "shutdown requested: no new leases, waiting for running tasks"
    );
    let drained = tokio::time::timeout(options.shutdown_grace, async {
        while workers.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            stopping = workers.len(),
            "grace period over: stopping running tasks and releasing their messages"
        );
        controller.interrupt.cancel();
        while workers.join_next().await.is_some() {}
    }
    watcher.abort();
    drop(controller);
    let _ = finisher.await;
    tracing::info!("daemon stopped");
    Ok(())
}

impl Controller {
    /// Processes one leased message to a recorded outcome. Every failure is logged here.
    async fn process(&self, lease: Lease) {
        let message = match QueueMessage::parse(&lease.body) {
            Ok(message) => message,
            Err(reason) => {
                tracing::warn!(message_id = %lease.message_id, %reason, "dead-lettering a message that does not parse");
                self.dead_letter(&lease, &reason).await;
                return;
            }
        };
        let span = tracing::info_span!(
            "task",
            task_id = %message.row_key,
            activity_type = %message.task_type,
            attempt = lease.dequeue_count,
            digest = tracing::field::Empty,
        );
        async {
            if let Err(error) = self.process_message(lease, message).await {
                tracing::error!(%error, "failed to process task");
            }
        }
        .instrument(span)
        .await
    }

    async fn process_message(&self, lease: Lease, message: QueueMessage) -> Result<()> {
        let record = self
            .backend
            .get_task(Some(&message.resource_id), &message.row_key)
            .await?;
        let Some(mut record) = record else {
            let reason = format!(
                "no task record with RowKey {:?} and PartitionKey {:?} in table {:?}",
                message.row_key, message.resource_id, message.active_table_name
            );
            tracing::warn!(%reason, "dead-lettering message");
            self.dead_letter(&lease, &reason).await;
            return Ok(());
        };
        if record.status.is_terminal() {
            // A second delivery of a finished task: its outcome is already stored.
            tracing::info!(status = %record.status, "acknowledging duplicate delivery of a finished task");
            self.backend.delete(std::slice::from_ref(&lease)).await?;
            return Ok(());
        }
        if lease.dequeue_count > self.options.max_deliveries {
            let reason = format!(
                "message delivered {} times, over the limit of {} deliveries: a worker stopped during each attempt{}",
                lease.dequeue_count,
                self.options.max_deliveries,
                record
                    .error_message
                    .as_deref()
                    .map(|last| format!("; last error: {last}"))
                    .unwrap_or_default()
            );
            tracing::warn!(%reason, "dead-lettering message");
            record.status = Status::Error;
            record.error_message = Some(reason.clone());
            record.end_time = Some(Utc::now());
            self.backend.finish_without_lease(&record).await?;
            self.dead_letter(&lease, &reason).await;
            return Ok(());
        }

        let component = match self.component_for(&message.task_type).await {
            Some(component) => component,
            None => {
                let reason = format!(
                    "no component registered for activity type {:?}: register one with `bgw register {} FILE.wasm`",
                    message.task_type, message.task_type
                );
                tracing::warn!(%reason, "task failed");
                record.status = Status::Error;
                record.error_message = Some(reason);
                record.end_time = Some(Utc::now());
                record.attempt = lease.dequeue_count;
                record.host_id = Some(self.options.host_id.clone());
                self.finish(lease, record).await?;
                return Ok(());
            }
        };
        tracing::Span::current().record("digest", component.version.digest.as_str());

        let start = AttemptStart {
            resource_id: record.partition_key.clone(),
            task_id: record.row_key.clone(),
            attempt: lease.dequeue_count,
            component_digest: component.version.digest.clone(),
            component_version: component.version.version,
            host_id: self.options.host_id.clone(),
            start_time: Utc::now(),
        };
        if self.backend.begin_attempt(&lease, &start).await? == Fenced::LeaseLost {
            tracing::warn!("lease lost before the attempt started: another worker has the task");
            return Ok(());
        }
        record.status = Status::Running;
        record.start_time = Some(start.start_time);
        record.attempt = start.attempt;
        record.component_digest = Some(start.component_digest.clone());
        record.component_version = Some(start.component_version);
        record.host_id = Some(start.host_id.clone());
        record.error_message = None;
        record.end_time = None;

        self.run_attempt(lease, record, component).await
    }

    async fn run_attempt(
        &self,
        lease: Lease,
        mut record: TaskRecord,
        component: Arc<LoadedComponent>,
    ) -> Result<()> {
        let progress = Arc::new(Mutex::new(None));
        let cancelled = Arc::new(AtomicBool::new(false));
        let output_ref = BlobRef {
            container: OUTPUT_CONTAINER.to_owned(),
            name: format!("{}/output", record.row_key),
        };

        let input = match (&record.container_name, &record.blob_name) {
            (Some(container), Some(name)) => {
                let blob = BlobRef {
                    container: container.clone(),
                    name: name.clone(),
                };
                match self.backend.blobs().open(&blob) {
                    Ok(opened) => Some(opened),
                    Err(error) => {
                        record.status = Status::Error;
                        record.error_message = Some(format!(
                            "failed to open the input blob {container}/{name}: {error}"
                        ));
                        record.end_time = Some(Utc::now());
                        tracing::warn!(%error, "task failed: input blob missing");
                        return self.finish(lease, record).await;
                    }
                }
            }
            _ => None,
        };

        let backend = self.backend.clone();
        let opened_ref = output_ref.clone();
        let context = TaskContext {
            task_id: record.row_key.clone(),
            resource_id: record.partition_key.clone(),
            activity_type: record.task_type.clone(),
            attempt: record.attempt,
            payload: record.input_payload.clone(),
            input,
            open_output: Box::new(move || {
                backend
                    .blobs()
                    .create(&opened_ref)
                    .map_err(anyhow::Error::from)
            }),
            cancelled: cancelled.clone(),
            interrupt: self.interrupt.child_token(),
            progress: progress.clone(),
            output_written: Arc::new(AtomicU64::new(0)),
        };

        let current_lease = Arc::new(Mutex::new(lease));
        let heartbeat = tokio::spawn(keep_alive(
            self.backend.clone(),
            current_lease.clone(),
            progress.clone(),
            record.partition_key.clone(),
            record.row_key.clone(),
            self.options.visibility_timeout,
        ));
        let report = self
            .sandbox
            .run(&component.prepared, context, component.version.limits)
            .await;
        heartbeat.abort();
        let _ = heartbeat.await;
        let lease = current_lease
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();

        record.end_time = Some(Utc::now());
        record.fuel_used = Some(report.fuel_used);
        record.task_log = Some(report.task_log).filter(|log| !log.is_empty());
        if let Some((percent, message)) = progress.lock().unwrap_or_else(|e| e.into_inner()).take()
        {
            record.progress = Some(percent);
            record.progress_message = Some(message);
        }

        let mut output = report.output;
        if matches!(report.outcome, Outcome::Interrupted) {
            tracing::info!("attempt interrupted by shutdown: releasing the message for another worker");
            if self.backend.release(&lease, Duration::ZERO).await? == Fenced::LeaseLost {
                tracing::warn!("lease already lost when releasing the message");
            }
            return Ok(());
        }
        match report.outcome {
            Outcome::Completed(result) => match validate::result(&result) {
                Ok(()) => {
                    record.status = Status::Completed;
                    record.output_payload = result;
                    record.progress = Some(100);
                }
                Err(error) => {
                    record.status = Status::Error;
                    record.error_message = Some(format!("invalid result: {error}"));
                    output = None;
                }
            },
            Outcome::GuestError(error) => {
                record.status = Status::Error;
                record.error_message = Some(describe_guest_error(&error));
                output = None;
            }
            Outcome::Trapped(fault) => {
                record.status = Status::Error;
                record.error_message = Some(fault.message());
                output = None;
            }
            Outcome::Interrupted => unreachable!("handled above"),
        }

        if let Some(writer) = output {
            match writer.commit() {
                Ok(()) => {
                    record.output_container_name = Some(output_ref.container.clone());
                    record.output_blob_name = Some(output_ref.name.clone());
                }
                Err(error) => {
                    record.status = Status::Error;
                    record.error_message =
                        Some(format!("failed to store the output blob: {error}"));
                }
            }
        }

        tracing::info!(
            status = %record.status,
            fuel_used = report.fuel_used,
            duration_us = report.duration.as_micros() as u64,
            error = record.error_message.as_deref().unwrap_or(""),
            "task finished"
        );
        self.finish(lease, record).await
    }

    async fn component_for(&self, activity_type: &str) -> Option<Arc<LoadedComponent>> {
        if let Some(component) = self.components.get(activity_type) {
            return Some(component);
        }
        // A registration may have landed since the last poll: look once more before failing.
        if let Err(error) = self.components.refresh().await {
            tracing::error!(%error, "failed to refresh the component registry");
        }
        self.components.get(activity_type)
    }

    async fn finish(&self, lease: Lease, record: TaskRecord) -> Result<()> {
        let (reply_tx, reply_rx) = oneshot::channel();
        let task_id = record.row_key.clone();
        if self
            .finisher
            .send((Finish { lease, record }, reply_tx))
            .await
            .is_err()
        {
            return Err(crate::Error::Invalid("the finisher has stopped".into()));
        }
        match reply_rx.await {
            Ok(Ok(Fenced::Written)) => Ok(()),
            Ok(Ok(Fenced::LeaseLost)) => {
                tracing::warn!(task_id = %task_id, "outcome discarded: the lease was lost to another worker");
                Ok(())
            }
            Ok(Err(error)) => Err(error),
            Err(_) => Err(crate::Error::Invalid(
                "the finisher dropped the request".into(),
            )),
        }
    }

    async fn dead_letter(&self, lease: &Lease, reason: &str) {
        if let Err(error) = self.backend.dead_letter(lease, reason).await {
            tracing::error!(message_id = %lease.message_id, %error, "failed to dead-letter a message");
        }
    }
}

/// Formats a guest's own error value for the record.
fn describe_guest_error(error: &TaskError) -> String {
    match error {
        TaskError::InvalidInput(message) => format!("invalid input: {message}"),
        TaskError::Failed(message) => format!("failed: {message}"),
        TaskError::Retryable(message) => format!("retryable error: {message}"),
    }
}

/// Extends the lease every third of the visibility timeout and writes new progress.
async fn keep_alive(
    backend: Arc<dyn Backend>,
    lease: Arc<Mutex<Lease>>,
    progress: Arc<Mutex<Option<(u8, String)>>>,
    resource_id: String,
    task_id: String,
    visibility: Duration,
) {
    let period = (visibility / 3).max(Duration::from_millis(100));
    let mut last_progress = None;
    loop {
        tokio::time::sleep(period).await;
        let held = lease.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match backend.extend(&held, visibility).await {
            Ok(Some(renewed)) => *lease.lock().unwrap_or_else(|e| e.into_inner()) = renewed,
            Ok(None) => {
                tracing::warn!(task_id = %task_id, "lease lost while the task runs");
                return;
            }
            Err(error) => tracing::warn!(task_id = %task_id, %error, "failed to extend the lease"),
        }

        let latest = progress.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if latest.is_some() && latest != last_progress {
            let (percent, message) = latest.clone().expect("checked above");
            let update = ProgressUpdate {
                resource_id: resource_id.clone(),
                task_id: task_id.clone(),
                percent,
                message,
            };
            if let Err(error) = backend.update_progress(&[update]).await {
                tracing::warn!(task_id = %task_id, %error, "failed to store progress");
            }
            last_progress = latest;
        }
    }
}

/// Commits terminal records in batches: whatever queued up while the last batch committed.
async fn run_finisher(
    backend: Arc<dyn Backend>,
    mut requests: mpsc::Receiver<(Finish, oneshot::Sender<Result<Fenced>>)>,
) {
    let mut batch = Vec::with_capacity(MAX_FINISH_BATCH);
    while requests.recv_many(&mut batch, MAX_FINISH_BATCH).await > 0 {
        let (finishes, replies): (Vec<Finish>, Vec<_>) = batch.drain(..).unzip();
        match backend.finish(&finishes).await {
            Ok(results) => {
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(Ok(result));
                }
            }
            Err(error) => {
                tracing::error!(%error, tasks = finishes.len(), "failed to store task outcomes");
                let message = error.to_string();
                for reply in replies {
                    let _ = reply.send(Err(crate::Error::Invalid(message.clone())));
                }
            }
        }
    }
}

async fn watch_registry(components: Arc<ComponentCache>, period: Duration) {
    loop {
        tokio::time::sleep(period).await;
        match components.refresh().await {
            Ok(true) => {
                tracing::info!("component registry changed: new tasks use the new versions")
            }
            Ok(false) => {}
            Err(error) => tracing::warn!(%error, "failed to check the component registry"),
        }
    }
}

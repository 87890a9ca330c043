//! The controller: leases messages, runs each task in the sandbox and records the outcome.
//!
//! One leasing loop fills free worker slots. Each leased message becomes a worker task
//! that checks the record, marks it RUNNING and keeps its lease alive while the guest
//! runs. The terminal record goes to the finisher, which commits outcomes in batches,
//! one transaction per batch on SQLite.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::backend::{
    instant_after, AttemptStart, Backend, BeginDecision, BegunAttempt, BlobRef, Fenced, Finish,
    Lease, LeasedTask, ProgressUpdate,
};
use crate::batch::Batcher;
use crate::record::{format_time, QueueMessage, Status, TaskRecord};
use crate::registry::{ComponentCache, LoadedComponent};
use crate::sandbox::{FaultKind, Outcome, Sandbox, TaskContext, TaskError};
use crate::{validate, Result};

/// Container that guests' output blobs are stored in.
pub const OUTPUT_CONTAINER: &str = "bgw-output";

/// Maximum worker slots of a daemon. `bgw daemon` sizes the sandbox's instance pool to its
/// concurrency, and the pool reserves about 8 GiB of address space per slot. So 1,024
/// slots reserve about 8.5 TiB of the 128 TiB that a Linux process has on x86-64. An idle
/// daemon kept about 15 MiB resident with 1, 256 and 1,024 slots (`VmRSS`, measured on a
/// 2-core x86-64 virtual machine).
pub const MAX_CONCURRENCY: usize = 1024;

/// Maximum visibility timeout of a lease: 7 days, the maximum that Azure Queue Storage
/// accepts for Get Messages and Update Message.
pub const MAX_VISIBILITY_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);

/// Default time a task waits for a component of its activity type to be registered.
pub const DEFAULT_MISSING_COMPONENT_GRACE: Duration = Duration::from_secs(30);

/// Interval at which a task waiting for a component is looked at again.
const COMPONENT_RECHECK: Duration = Duration::from_secs(2);

/// Maximum interval at which a message whose record may still be stored is looked at again.
const MISSING_RECORD_RECHECK: Duration = Duration::from_secs(2);

/// Default number of attempts in a row without a recorded outcome after which a message is
/// dead-lettered.
pub const DEFAULT_MAX_DELIVERIES: u32 = 5;

/// Largest number of attempt starts or terminal records committed in one batch.
const MAX_BATCH: usize = 256;

/// Settings of the daemon.
#[derive(Clone, Debug)]
pub struct DaemonOptions {
    /// Tasks run at once, from 1 to [`MAX_CONCURRENCY`].
    pub concurrency: usize,
    /// How long a leased message stays invisible before another worker may take it, more
    /// than zero and at most [`MAX_VISIBILITY_TIMEOUT`]. Running tasks extend it every
    /// third of this period.
    pub visibility_timeout: Duration,
    /// Maximum pause between polls of an empty queue.
    pub idle_poll: Duration,
    /// Interval between checks of the registry for new component versions.
    pub registry_poll: Duration,
    /// Time running tasks get to finish after a shutdown signal.
    pub shutdown_grace: Duration,
    /// Name of this host, stored in each record it runs.
    pub host_id: String,
    /// Attempts in a row that began and recorded no outcome, because their worker stopped,
    /// after which the task ends ERROR and its message is dead-lettered instead of run
    /// again. So a message that crashes its worker every time cannot loop forever.
    pub max_deliveries: u32,
    /// Time a task whose activity type has no component waits for a registration, counted
    /// on the queue's clock from the first look that found no component, before it ends
    /// ERROR.
    pub missing_component_grace: Duration,
}

impl Default for DaemonOptions {
    fn default() -> Self {
        DaemonOptions {
            concurrency: std::thread::available_parallelism()
                .map_or(2, |n| n.get())
                .min(MAX_CONCURRENCY),
            visibility_timeout: Duration::from_secs(30),
            idle_poll: Duration::from_millis(50),
            registry_poll: Duration::from_millis(50),
            shutdown_grace: Duration::from_secs(30),
            host_id: default_host_id(),
            max_deliveries: DEFAULT_MAX_DELIVERIES,
            missing_component_grace: DEFAULT_MISSING_COMPONENT_GRACE,
        }
    }
}

/// Checks the options that a caller of the library may set to any value. The concurrency
/// may not exceed `pool_size`, the slots of the sandbox's instance pool, so that every
/// worker slot has an instance slot.
fn check_options(options: &DaemonOptions, pool_size: Option<u32>) -> Result<()> {
    if !(1..=MAX_CONCURRENCY).contains(&options.concurrency) {
        return Err(crate::Error::Invalid(format!(
            "invalid concurrency {}: it must be from 1 to {MAX_CONCURRENCY}",
            options.concurrency
        )));
    }
    if let Some(pool_size) = pool_size.filter(|size| options.concurrency > *size as usize) {
        return Err(crate::Error::Invalid(format!(
            "invalid concurrency {}: the sandbox's instance pool has only {pool_size} slots, \
             so create the sandbox with `pooled_instances` of at least {0}",
            options.concurrency
        )));
    }
    let visibility = options.visibility_timeout;
    if visibility.is_zero() || visibility > MAX_VISIBILITY_TIMEOUT {
        return Err(crate::Error::Invalid(format!(
            "invalid visibility timeout of {} ms: it must be more than 0 and at most {} s",
            visibility.as_millis(),
            MAX_VISIBILITY_TIMEOUT.as_secs()
        )));
    }
    Ok(())
}

/// Returns `HOSTNAME:PID`, which distinguishes hosts and restarts in task records.
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
    /// Batched reads of the records that leased messages name.
    reader: Batcher<(String, String), Option<TaskRecord>>,
    /// Group commit of attempt starts.
    starter: Batcher<(Lease, AttemptStart), Result<Fenced>>,
    /// Group commit of terminal records.
    finisher: Batcher<Finish, Fenced>,
    /// Worker slots and the count of leased tasks not yet run.
    pipeline: Pipeline,
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
    check_options(&options, sandbox.pool_size())?;
    let components = Arc::new(ComponentCache::new(sandbox.clone(), backend.clone()));
    components.refresh().await?;
    backend.serve_daemon();

    let reads_backend = backend.clone();
    let (reader, reader_task) = Batcher::spawn(
        "read tasks",
        MAX_BATCH,
        move |keys: Vec<(String, String)>| {
            let backend = reads_backend.clone();
            async move { backend.get_tasks(&keys).await }
        },
    );
    let starts_backend = backend.clone();
    let (starter, starter_task) = Batcher::spawn(
        "begin attempts",
        MAX_BATCH,
        move |items: Vec<(Lease, AttemptStart)>| {
            let backend = starts_backend.clone();
            async move { backend.begin_attempts(&items).await }
        },
    );
    let finishes_backend = backend.clone();
    let (finisher, finisher_task) =
        Batcher::spawn("finish tasks", MAX_BATCH, move |items: Vec<Finish>| {
            let backend = finishes_backend.clone();
            async move { backend.finish(&items).await }
        });
    let watcher = tokio::spawn(watch_registry(components.clone(), options.registry_poll));
    let decide = begin_decision(components.clone(), options.clone());

    let controller = Arc::new(Controller {
        backend: backend.clone(),
        sandbox,
        components,
        options: options.clone(),
        interrupt: CancellationToken::new(),
        reader,
        starter,
        finisher,
        pipeline: Pipeline::new(options.concurrency, options.visibility_timeout),
    });
    tracing::info!(
        concurrency = options.concurrency,
        host_id = %options.host_id,
        "daemon started"
    );

    let mut workers = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        while workers.try_join_next().is_some() {}

        // Lease as many messages as the in-flight limit leaves room for; wait when it is full.
        let limit = controller
            .pipeline
            .limit(options.concurrency, options.visibility_timeout);
        let room = limit.saturating_sub(controller.pipeline.in_flight());
        if room == 0 {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = controller.pipeline.changed() => continue,
            }
        }
        let leased = backend
            .lease_and_begin(
                room.min(MAX_BATCH),
                options.visibility_timeout,
                decide.clone(),
            )
            .await;
        let tasks = match leased {
            Ok(tasks) => tasks,
            Err(error) => {
                tracing::error!(%error, "failed to lease messages, retrying in 1 s");
                tokio::select! {
                    _ = &mut shutdown => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        if tasks.is_empty() {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = backend.wait_for_change(options.idle_poll) => continue,
            }
        }

        for task in tasks {
            let ticket = controller.pipeline.enter();
            let controller = controller.clone();
            // Boxed, because tokio copies a spawned future several times while spawning it.
            workers.spawn(Box::pin(
                async move { controller.process(task, ticket).await },
            ));
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
    let _ = reader_task.await;
    let _ = starter_task.await;
    let _ = finisher_task.await;
    tracing::info!("daemon stopped");
    Ok(())
}

impl Controller {
    /// Processes one leased message to a recorded outcome. Every failure is logged here.
    /// The worker slot is given back as soon as the guest has run, so that the next
    /// message can start while this outcome is committed.
    async fn process(&self, task: LeasedTask, ticket: Ticket) {
        let LeasedTask { lease, begun } = task;
        let message = match QueueMessage::parse(&lease.body) {
            Ok(message) => message,
            Err(reason) => {
                tracing::warn!(message_id = %lease.message_id, %reason, "dead-lettering a message that does not parse");
                self.fail_task_of_encoded_message(&lease.body, &reason)
                    .await;
                self.dead_letter(&lease, &reason).await;
                return;
            }
        };
        // `attempt` is filled in once the delivery begins an attempt, so that the log and
        // the record agree. A delivery that only waits for a component has none.
        let span = tracing::info_span!(
            "task",
            task_id = %message.row_key,
            activity_type = %message.task_type,
            delivery = lease.dequeue_count,
            attempt = tracing::field::Empty,
            digest = tracing::field::Empty,
        );
        async {
            let processed = match begun {
                Some(begun) => self.run_begun(lease, begun, ticket).await,
                None => self.process_message(lease, message, ticket).await,
            };
            if let Err(error) = processed {
                tracing::error!(%error, "failed to process task");
            }
        }
        .instrument(span)
        .await
    }

    async fn process_message(
        &self,
        lease: Lease,
        message: QueueMessage,
        ticket: Ticket,
    ) -> Result<()> {
        let record = self
            .reader
            .call((message.resource_id.clone(), message.row_key.clone()))
            .await?;
        let Some(mut record) = record else {
            return self.handle_missing_record(lease, &message).await;
        };
        if record.status.is_terminal() {
            // A second delivery of a finished task: its outcome is already stored.
            tracing::info!(status = %record.status, "acknowledging duplicate delivery of a finished task");
            self.backend.delete(std::slice::from_ref(&lease)).await?;
            return Ok(());
        }
        let lost = lost_attempts(&record);
        if lost >= self.options.max_deliveries {
            let reason = format!(
                "message delivered {} times with {lost} attempts in a row that recorded no outcome, reaching the limit of {} deliveries: a worker stopped during each of them{}",
                lease.dequeue_count,
                self.options.max_deliveries,
                record
                    .error_message
                    .as_deref()
                    .map(|last| format!("; last error: {last}"))
                    .unwrap_or_default()
            );
            tracing::warn!(%reason, "dead-lettering message");
            // The entry of the last lost attempt carries the outcome, so that a requeued
            // task starts with no lost attempts.
            record.status = Status::Error;
            record.error_message = Some(reason.clone());
            record.fuel_used = None;
            record.set_end_time_now();
            record.attempt_history.push(record.current_attempt());
            return self.finish(lease, record, Some(reason)).await;
        }

        // NOTE: a deadline is a time on the submitting client's clock, and every check of it
        // compares it with this host's clock, so a skew between the two moves it by as much.
        if let Some(deadline) = record
            .deadline_time
            .filter(|deadline| *deadline <= Utc::now())
        {
            let reason = format!(
                "task deadline {} passed before the task could start",
                format_time(&deadline)
            );
            record.attempt = next_attempt(&record);
            tracing::Span::current().record("attempt", record.attempt);
            tracing::warn!(%reason, "task failed");
            return self.end_with_error(lease, record, reason).await;
        }

        let component = match self.component_for(&message.task_type).await {
            Some(component) => component,
            None => return self.wait_for_component(lease, record).await,
        };
        tracing::Span::current().record("digest", component.version.digest.as_str());

        let start = AttemptStart {
            resource_id: record.partition_key.clone(),
            task_id: record.row_key.clone(),
            attempt: next_attempt(&record),
            component_digest: component.version.digest.clone(),
            component_version: component.version.version,
            host_id: self.options.host_id.clone(),
            start_time: crate::record::now(),
        };
        tracing::Span::current().record("attempt", start.attempt);
        if self.starter.call((lease.clone(), start.clone())).await?? == Fenced::LeaseLost {
            tracing::warn!("lease lost before the attempt started: another worker has the task");
            return Ok(());
        }
        mark_running(&mut record, &start);

        self.run_attempt(lease, record, component, ticket).await
    }

    /// Runs an attempt that began when its message was leased (see [`begin_decision`]).
    async fn run_begun(&self, lease: Lease, begun: BegunAttempt, ticket: Ticket) -> Result<()> {
        let BegunAttempt {
            mut record,
            start,
            token,
        } = begun;
        let component = match token.downcast::<Arc<LoadedComponent>>() {
            Ok(component) => *component,
            Err(_) => {
                return Err(crate::Error::Invalid(
                    "begun attempt carries no component version".to_owned(),
                ))
            }
        };
        let span = tracing::Span::current();
        span.record("attempt", start.attempt);
        span.record("digest", component.version.digest.as_str());
        mark_running(&mut record, &start);

        self.run_attempt(lease, record, component, ticket).await
    }

    async fn run_attempt(
        &self,
        lease: Lease,
        mut record: TaskRecord,
        component: Arc<LoadedComponent>,
        // Held until this function returns, so the task counts as in flight until its
        // outcome is stored.
        _ticket: Ticket,
    ) -> Result<()> {
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
                        tracing::warn!(%error, "task failed: input blob missing");
                        let reason =
                            format!("failed to open the input blob {container}/{name}: {error}");
                        return self.end_with_error(lease, record, reason).await;
                    }
                }
            }
            _ => None,
        };

        // The task's deadline, moved to the monotonic clock to the millisecond, ends the
        // attempt when it comes before the activity's timeout.
        let limits = component.version.limits;
        let deadline = record.deadline_time.map(|deadline| {
            let left = (deadline - Utc::now()).to_std().unwrap_or(Duration::ZERO);
            instant_after(left)
        });

        let watch = AttemptWatch::new(self.interrupt.child_token());
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
            cancelled: watch.cancelled.clone(),
            interrupt: watch.interrupt.clone(),
            progress: watch.progress.clone(),
            output_written: Arc::new(AtomicU64::new(0)),
            deadline,
        };

        let current_lease = Arc::new(Mutex::new(lease));
        let stop_keep_alive = CancellationToken::new();
        let heartbeat = keep_alive(
            self.backend.clone(),
            current_lease.clone(),
            watch.clone(),
            stop_keep_alive.clone(),
            record.partition_key.clone(),
            record.row_key.clone(),
            self.options.visibility_timeout,
        );
        // Only guest execution takes a worker slot: reading the record, starting the attempt
        // and committing the outcome overlap with other tasks' execution.
        let waiting_since = std::time::Instant::now();
        let wait = self.slot_holding_lease(&current_lease, deadline).await;
        let held_lease = || {
            current_lease
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
        };
        let slot = match wait {
            SlotWait::LeaseLost => return Ok(()),
            SlotWait::Slot(slot) if deadline.is_none_or(|at| std::time::Instant::now() < at) => {
                slot
            }
            // The deadline was checked before the wait for a slot, and a task leased ahead
            // can wait past it.
            wait => {
                drop(wait);
                // A cancellation requested during the wait came first, and the record read
                // before it would otherwise overwrite the request.
                if self.cancel_requested(&record).await {
                    return self.end_cancelled_before_run(held_lease(), record).await;
                }
                let reason = format!(
                    "task deadline {} passed while the task waited for a worker slot",
                    record
                        .deadline_time
                        .as_ref()
                        .map(format_time)
                        .unwrap_or_default()
                );
                tracing::warn!(%reason, "task failed before its guest ran");
                record.start_time = None;
                record.fuel_used = None;
                return self.end_with_error(held_lease(), record, reason).await;
            }
        };
        // The attempt of a task leased ahead began before it had a slot, so `bgw cancel`
        // only flagged it. The keep-alive reads the flag every CANCEL_POLL while the guest
        // runs, so only a task that waited at least that long pays for a read here.
        if waiting_since.elapsed() >= CANCEL_POLL && self.cancel_requested(&record).await {
            drop(slot);
            return self.end_cancelled_before_run(held_lease(), record).await;
        }
        let start_time = crate::record::now();
        record.start_time = Some(start_time);
        let started = std::time::Instant::now();
        let run = self.sandbox.run(&component.prepared, context, limits);
        // Boxed, like the commit in `finish`, to keep the worker's future small, because
        // every level of a nested future is copied when it is first polled.
        let report = Box::pin(run_beside_keep_alive(run, heartbeat, &stop_keep_alive)).await;
        drop(slot);
        let run_time = started.elapsed();
        self.pipeline.record_duration(run_time);
        let lease = held_lease();

        // Measured on the monotonic clock, so that a step of the wall clock during the run
        // cannot make the attempt end before it started.
        record.end_time = Some(crate::record::truncate_to_micros(
            start_time + chrono::TimeDelta::from_std(run_time).unwrap_or_default(),
        ));
        record.fuel_used = Some(report.fuel_used);
        record.task_log = Some(report.task_log).filter(|log| !log.is_empty());
        if let Some((percent, message)) = watch
            .progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            record.progress = Some(percent);
            record.progress_message = Some(message);
        }

        let cancelled = watch.cancelled.load(Ordering::Relaxed);
        if matches!(report.outcome, Outcome::Interrupted) && !cancelled {
            return self.put_back_interrupted(lease, record).await;
        }

        let mut output = report.output;
        let mut retryable = false;
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
                }
            },
            Outcome::GuestError(error) => {
                retryable = matches!(error, TaskError::Retryable(_));
                record.status = Status::Error;
                record.error_message = Some(describe_guest_error(&error));
            }
            Outcome::Trapped(FaultKind::TaskDeadline) => {
                record.status = Status::Error;
                record.error_message = Some(format!(
                    "task deadline {} reached while the attempt ran",
                    record
                        .deadline_time
                        .map(|time| format_time(&time))
                        .unwrap_or_default()
                ));
            }
            Outcome::Trapped(fault) => {
                retryable = fault.is_retryable();
                record.status = Status::Error;
                record.error_message = Some(fault.message());
            }
            Outcome::Interrupted => {
                record.status = Status::Cancelled;
                record.error_message = Some("cancelled while running".to_owned());
            }
        }
        if cancelled && record.status == Status::Error {
            record.status = Status::Cancelled;
            record.error_message = Some(format!(
                "cancelled while running; the attempt ended with: {}",
                record.error_message.take().unwrap_or_default()
            ));
        }
        if record.status != Status::Completed {
            output = None;
        }
        record.attempt_history.push(record.current_attempt());

        let retry = &component.version.limits.retry;
        let counted = counted_attempts(&record);
        let attempt = describe_attempt(&record, retry.max_attempts);
        let mut retryable_error = record.status == Status::Error && retryable;
        let attempts_left = counted < retry.max_attempts;
        let delay = retry.delay_before(counted + 1);
        // No retry is made that would start after the task's deadline: the task ends now,
        // with this attempt's error, rather than later without a run. Without attempts
        // left, a passed deadline also keeps the message out of the dead letters.
        let wait_before_retry = if attempts_left {
            chrono::TimeDelta::from_std(delay).unwrap_or_default()
        } else {
            chrono::TimeDelta::zero()
        };
        let retry_at = Utc::now() + wait_before_retry;
        let deadline_first = record
            .deadline_time
            .filter(|deadline| retryable_error && *deadline <= retry_at);
        if let Some(deadline) = deadline_first {
            retryable_error = false;
            if attempts_left {
                let error = record.error_message.take().unwrap_or_default();
                record.error_message = Some(format!(
                    "{attempt} failed, and a retry in {:.1} s would start after the task \
                     deadline {}: {error}",
                    delay.as_secs_f64(),
                    format_time(&deadline)
                ));
            }
        }
        if retryable_error && attempts_left {
            let error = record.error_message.take().unwrap_or_default();
            tracing::warn!(
                fuel_used = report.fuel_used,
                %error,
                retry_in_ms = delay.as_millis() as u64,
                "attempt failed, retrying"
            );
            record.status = Status::Created;
            record.error_message = Some(format!(
                "{attempt} failed, retrying in {:.1} s: {error}",
                delay.as_secs_f64()
            ));
            if self.backend.retry(&lease, &record, delay).await? == Fenced::LeaseLost {
                tracing::warn!(
                    "lease lost before the retry was stored: another worker has the task"
                );
            }
            return Ok(());
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

        // A retryable failure with no attempts left may succeed later, for example on a
        // fixed component, so its message goes to the dead letters for `bgw requeue`.
        let dead_letter = retryable_error.then(|| {
            format!(
                "{attempt} failed and no attempts are left: {}",
                record.error_message.as_deref().unwrap_or_default()
            )
        });
        match record.error_message.as_deref() {
            Some(error) => tracing::warn!(
                status = %record.status,
                fuel_used = report.fuel_used,
                duration_us = report.duration.as_micros() as u64,
                error,
                dead_lettered = dead_letter.is_some(),
                "task finished"
            ),
            // At debug level, because one line per task cost about 6% of a worker thread's
            // time when trivial tasks ran at thousands per second.
            None => tracing::debug!(
                status = %record.status,
                fuel_used = report.fuel_used,
                duration_us = report.duration.as_micros() as u64,
                "task finished"
            ),
        }
        self.finish(lease, record, dead_letter).await
    }

    /// Puts a task whose attempt was interrupted, by a shutdown or a lost lease, back in the
    /// queue. The record goes back to CREATED, with the attempt marked as interrupted in its
    /// history, in the same fenced write that makes the message visible again at once. So
    /// the record does not stay RUNNING until another daemon takes the task, and the attempt
    /// uses none of the retry budget.
    async fn put_back_interrupted(&self, lease: Lease, mut record: TaskRecord) -> Result<()> {
        let shutdown = self.interrupt.is_cancelled();
        if shutdown {
            tracing::info!(
                "attempt interrupted by shutdown: releasing the message for another worker"
            );
        }
        let cause = match shutdown {
            true => "a daemon shutdown",
            false => "the loss of its lease",
        };
        record.status = Status::Created;
        let mut interrupted = record.current_attempt();
        interrupted.error_message = Some(format!("interrupted by {cause}"));
        interrupted.interrupted = true;
        record.attempt_history.push(interrupted);
        record.error_message = Some(format!(
            "attempt {} was interrupted by {cause} and runs again; it does not count toward \
             the retry policy",
            record.attempt
        ));

        if self.backend.retry(&lease, &record, Duration::ZERO).await? == Fenced::LeaseLost {
            tracing::warn!("lease already lost when releasing the message");
        }
        Ok(())
    }

    /// Handles a message whose task record does not exist.
    ///
    /// A backend whose submit enqueues the message before it stores the record (Azure)
    /// names a window of message ages in which the record may still appear. Inside it the
    /// message is released and looked at again. Outside it the message is dead-lettered,
    /// with a reason stating that the submit failed when the window has passed.
    async fn handle_missing_record(&self, lease: Lease, message: &QueueMessage) -> Result<()> {
        let age = (Utc::now() - lease.inserted_at)
            .to_std()
            .unwrap_or(Duration::ZERO);
        let missing = format!(
            "no task record with RowKey {:?} and PartitionKey {:?} in table {:?}",
            message.row_key, message.resource_id, message.active_table_name
        );
        let window = self.backend.pending_record_window();

        if let Some(window) = window.as_ref().filter(|window| window.contains(&age)) {
            let delay = (window.end - age).min(MISSING_RECORD_RECHECK);
            let waiting = "task record not stored yet: its submit may still be storing it";
            match lease.dequeue_count {
                1 => tracing::info!(age_secs = age.as_secs(), "{waiting}"),
                _ => tracing::debug!(age_secs = age.as_secs(), "{waiting}"),
            }
            if self.backend.release(&lease, delay).await? == Fenced::LeaseLost {
                tracing::warn!("lease lost while the task record was missing");
            }
            return Ok(());
        }

        let reason = match window {
            Some(window) if age >= window.end => format!(
                "{missing} {} s after the message was enqueued: the submit that enqueued the \
                 message never stored the record",
                age.as_secs()
            ),
            _ => missing,
        };
        tracing::warn!(%reason, "dead-lettering message");
        self.dead_letter(&lease, &reason).await;
        Ok(())
    }

    /// Handles a task whose activity type has no component.
    ///
    /// Within the grace period after the first look that found no component, the task
    /// waits for a registration and is looked at again. The record keeps the lease time of
    /// that first look, so the wait counts only time that the task was visible and looked
    /// at, whatever its delay or time in the queue before. A wait is not an attempt: the
    /// attempt number, the history and the retry budget stay as they are. After the grace
    /// period, the task ends ERROR and its message is dead-lettered, so that `bgw requeue`
    /// can send it again once a component exists.
    async fn wait_for_component(&self, lease: Lease, mut record: TaskRecord) -> Result<()> {
        let activity_type = record.task_type.clone();
        let grace = self.options.missing_component_grace;
        let first_look = record.component_wait_start.is_none();
        let leased_at = leased_at(&lease, self.options.visibility_timeout);
        let waited = component_wait(&mut record, leased_at);

        if waited < grace {
            let delay = (grace - waited).min(COMPONENT_RECHECK);
            let reason = format!(
                "no component registered for activity type {activity_type:?} yet: waiting up to {} s for `bgw register {activity_type} FILE.wasm`",
                grace.as_secs()
            );
            if first_look {
                tracing::info!(%reason, "task waits for a component");
            } else {
                tracing::debug!(
                    waited_secs = waited.as_secs(),
                    "task still waits for a component"
                );
            }
            record.status = Status::Created;
            record.error_message = Some(reason);
            if self.backend.retry(&lease, &record, delay).await? == Fenced::LeaseLost {
                tracing::warn!("lease lost while the task waits for a component");
            }
            return Ok(());
        }

        let reason = format!(
            "no component registered for activity type {activity_type:?} within {} s: register one with `bgw register {activity_type} FILE.wasm`, then `bgw requeue` the dead letter",
            grace.as_secs()
        );
        record.attempt = next_attempt(&record);
        tracing::Span::current().record("attempt", record.attempt);
        tracing::warn!(%reason, "task failed and its message is dead-lettered");
        record.host_id = Some(self.options.host_id.clone());
        record.start_time = None;
        record.component_wait_start = None;
        record.status = Status::Error;
        record.error_message = Some(reason.clone());
        record.set_end_time_now();
        record.attempt_history.push(record.current_attempt());
        self.finish(lease, record, Some(reason)).await
    }

    /// Ends ERROR the task that a base64-encoded message names, when it is CREATED, so that
    /// the task does not stay CREATED once its only message is dead-lettered. A task that
    /// runs is left to its own attempt, whose worker holds the lease and stores the outcome,
    /// and a finished one keeps its outcome. The base64 delivery is not an attempt, so
    /// `Attempt` and `AttemptHistory` stay as they are.
    async fn fail_task_of_encoded_message(&self, body: &str, reason: &str) {
        let Some(message) = QueueMessage::parse_base64(body) else {
            return;
        };
        let error_message = format!(
            "{reason}; its message body was base64, which bgw does not decode, so the message \
             was dead-lettered: send task messages as plain UTF-8 JSON text, then submit the \
             task again with `bgw submit`, because `bgw requeue` would send the same base64 body"
        );
        let ended = self
            .backend
            .end_unstarted(
                &message.resource_id,
                &message.row_key,
                Status::Error,
                &error_message,
            )
            .await;
        match ended {
            Ok(true) => {
                tracing::warn!(task_id = %message.row_key, "task of a base64 message ended ERROR")
            }
            Ok(false) => tracing::info!(
                task_id = %message.row_key,
                "task of a base64 message is running or has ended: leaving it as it is"
            ),
            Err(error) => tracing::error!(
                task_id = %message.row_key,
                %error,
                "failed to record the error of a task with a base64 message"
            ),
        }
    }

    /// Returns whether a cancellation was requested for the task. A failed read counts as
    /// no request, because the keep-alive reads the flag again while the guest runs.
    async fn cancel_requested(&self, record: &TaskRecord) -> bool {
        let requested = self
            .backend
            .cancel_requested(&record.partition_key, &record.row_key)
            .await;
        requested.unwrap_or_else(|error| {
            tracing::warn!(%error, "failed to check for cancellation before the run");
            false
        })
    }

    /// Ends CANCELLED, without running its guest, a task whose attempt began and whose
    /// cancellation was requested while it waited for a worker slot.
    async fn end_cancelled_before_run(&self, lease: Lease, mut record: TaskRecord) -> Result<()> {
        tracing::info!("cancellation requested while the task waited for a worker slot: ending it without running it");
        record.status = Status::Cancelled;
        record.error_message = Some("cancelled before it started".to_owned());
        record.cancel_requested = true;
        record.start_time = None;
        record.fuel_used = None;
        record.set_end_time_now();
        record.attempt_history.push(record.current_attempt());
        self.finish(lease, record, None).await
    }

    /// Ends a task ERROR with `reason` before its component ran.
    async fn end_with_error(
        &self,
        lease: Lease,
        mut record: TaskRecord,
        reason: String,
    ) -> Result<()> {
        record.status = Status::Error;
        record.error_message = Some(reason);
        record.set_end_time_now();
        record.attempt_history.push(record.current_attempt());
        self.finish(lease, record, None).await
    }

    /// Waits for a worker slot and extends the lease every third of the visibility timeout
    /// meanwhile. A task leased ahead can wait longer than the lease when the tasks before
    /// it run longer than the daemon expected. The wait also ends when the lease is lost,
    /// because another delivery owns the task then, or when `deadline` passes.
    async fn slot_holding_lease(
        &self,
        lease: &Mutex<Lease>,
        deadline: Option<std::time::Instant>,
    ) -> SlotWait {
        let visibility = self.options.visibility_timeout;
        let renew_every = (visibility / 3).max(CANCEL_POLL);
        let deadline_at =
            tokio::time::Instant::from_std(deadline.unwrap_or_else(std::time::Instant::now));
        // Pinned once, so that the task keeps its place in the slot queue across renewals.
        let acquire = self.pipeline.execution_slot();
        tokio::pin!(acquire);
        loop {
            tokio::select! {
                biased;
                slot = &mut acquire => return SlotWait::Slot(slot),
                () = tokio::time::sleep_until(deadline_at), if deadline.is_some() => {
                    return SlotWait::DeadlinePassed;
                }
                () = tokio::time::sleep(renew_every) => {}
            }
            let held = lease.lock().unwrap_or_else(|e| e.into_inner()).clone();
            match self.backend.extend(&held, visibility).await {
                Ok(Some(renewed)) => *lease.lock().unwrap_or_else(|e| e.into_inner()) = renewed,
                Ok(None) => {
                    tracing::warn!("lease lost while the task waited for a worker slot: another worker has the task");
                    return SlotWait::LeaseLost;
                }
                Err(error) => {
                    tracing::warn!(%error, "failed to extend the lease of a task waiting for a worker slot")
                }
            }
        }
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

    /// Stores a terminal record and deletes its message, or moves the message to the dead
    /// letters with `dead_letter` as the reason, under the lease.
    async fn finish(
        &self,
        lease: Lease,
        record: TaskRecord,
        dead_letter: Option<String>,
    ) -> Result<()> {
        let task_id = record.row_key.clone();
        let finish = Finish {
            lease,
            record,
            dead_letter,
        };
        // Boxed, like the run, to keep the worker's future small.
        if Box::pin(self.finisher.call(finish)).await? == Fenced::LeaseLost {
            tracing::warn!(task_id = %task_id, "outcome discarded: the lease was lost to another worker");
        }
        Ok(())
    }

    async fn dead_letter(&self, lease: &Lease, reason: &str) {
        if let Err(error) = self.backend.dead_letter(lease, reason).await {
            tracing::error!(message_id = %lease.message_id, %error, "failed to dead-letter a message");
        }
    }
}

/// Worker slots, and the count of leased tasks whose outcome is not stored yet.
///
/// The daemon leases ahead of its slots so that reads, attempt starts and outcomes can be
/// committed in batches while guests run. How far ahead depends on how long tasks take
/// and on how fast the backend stores them. Every leased task must reach its stored
/// outcome well within the visibility timeout, so for long tasks, or a slow backend, the
/// daemon leases little or nothing ahead.
#[derive(Clone)]
struct Pipeline {
    slots: Arc<Semaphore>,
    in_flight: Arc<AtomicUsize>,
    changed: Arc<Notify>,
    /// Moving average of guest run time, in microseconds; 0 until a task has run.
    average_run_us: Arc<AtomicU64>,
    /// Tasks that left the pipeline in recent windows of a quarter visibility timeout.
    exits: Arc<Mutex<ExitWindow>>,
}

/// Counts of tasks leaving the pipeline, per window of fixed length.
struct ExitWindow {
    length: Duration,
    started: std::time::Instant,
    current: usize,
    /// Count of the window before the current one, or 0 if that one saw none.
    previous: usize,
}

impl ExitWindow {
    fn record(&mut self) {
        let now = std::time::Instant::now();
        let elapsed = now.duration_since(self.started);
        if elapsed >= self.length {
            self.previous = match elapsed < self.length * 2 {
                true => self.current,
                false => 0,
            };
            self.current = 0;
            self.started = now;
        }
        self.current += 1;
    }

    /// Tasks that left in a recent window: the larger of the last full one and the
    /// current one.
    fn recent(&self) -> usize {
        self.previous.max(self.current)
    }
}

/// Counts one leased task as in flight until its outcome is stored or it ended early.
struct Ticket {
    pipeline: Pipeline,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.pipeline
            .exits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record();
        self.pipeline.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.pipeline.changed.notify_one();
    }
}

impl Pipeline {
    fn new(concurrency: usize, visibility: Duration) -> Self {
        Pipeline {
            slots: Arc::new(Semaphore::new(concurrency)),
            in_flight: Arc::new(AtomicUsize::new(0)),
            changed: Arc::new(Notify::new()),
            average_run_us: Arc::new(AtomicU64::new(0)),
            exits: Arc::new(Mutex::new(ExitWindow {
                length: (visibility / 4).max(Duration::from_millis(1)),
                started: std::time::Instant::now(),
                current: 0,
                previous: 0,
            })),
        }
    }

    fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    fn enter(&self) -> Ticket {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        Ticket {
            pipeline: self.clone(),
        }
    }

    async fn changed(&self) {
        self.changed.notified().await
    }

    async fn execution_slot(&self) -> OwnedSemaphorePermit {
        self.slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed")
    }

    /// Returns how many leased tasks may be in flight: the worker slots, plus as many more
    /// as the slots can run within a quarter of the visibility timeout at the average run
    /// time, but no more than the daemon stored outcomes for in a recent quarter of the
    /// visibility timeout, and at most [`MAX_PREFETCH`].
    fn limit(&self, concurrency: usize, visibility: Duration) -> usize {
        let average = self.average_run_us.load(Ordering::Relaxed);
        if average == 0 {
            return concurrency;
        }
        let budget_us = (visibility.as_micros() / 4) as u64;
        let runnable = (budget_us / average).saturating_mul(concurrency as u64);
        let stored = self
            .exits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .recent() as u64;
        let ahead = runnable.min(stored).min(MAX_PREFETCH as u64);
        concurrency + ahead as usize
    }

    fn record_duration(&self, duration: Duration) {
        let sample = (duration.as_micros() as u64).max(1);
        let previous = self.average_run_us.load(Ordering::Relaxed);
        let next = if previous == 0 {
            sample
        } else {
            (previous * 7 + sample) / 8
        };
        self.average_run_us.store(next, Ordering::Relaxed);
    }
}

/// Outcome of a task's wait for a worker slot.
enum SlotWait {
    /// The task has a slot and may run its guest.
    Slot(OwnedSemaphorePermit),
    /// Another delivery took over the task's message while it waited.
    LeaseLost,
    /// The task's deadline passed while it waited.
    DeadlinePassed,
}

/// Most leased tasks a daemon holds beyond its worker slots. Four leases of [`MAX_BATCH`]
/// let one batch be leased while others run and commit: in back-to-back drains of 20,000
/// trivial tasks on 2 cores, 1,024 beat 256, 512 and 2,048.
const MAX_PREFETCH: usize = 4 * MAX_BATCH;

/// Builds the decision that lets the backend begin an attempt when it leases the message.
///
/// It accepts only the common case: an active record that is not terminal, has not reached
/// the limit of lost attempts or its deadline, and whose activity type has a component.
/// Anything else is left to [`Controller::process_message`], which checks every case again
/// and handles it. The component version chosen here travels with the attempt, so the task
/// runs the version its record names even if a new one is registered meanwhile.
fn begin_decision(components: Arc<ComponentCache>, options: DaemonOptions) -> Arc<BeginDecision> {
    Arc::new(
        move |_lease: &Lease, message: &QueueMessage, record: &TaskRecord| {
            if record.status.is_terminal() {
                return None;
            }
            if lost_attempts(record) >= options.max_deliveries {
                return None;
            }
            if record
                .deadline_time
                .is_some_and(|deadline| deadline <= Utc::now())
            {
                return None;
            }
            let component = components.get(&message.task_type)?;
            let start = AttemptStart {
                resource_id: record.partition_key.clone(),
                task_id: record.row_key.clone(),
                attempt: next_attempt(record),
                component_digest: component.version.digest.clone(),
                component_version: component.version.version,
                host_id: options.host_id.clone(),
                start_time: crate::record::now(),
            };
            let token: Box<dyn std::any::Any + Send> = Box::new(component);
            Some((start, token))
        },
    )
}

/// Updates a record in memory as `begin_attempt` stored it.
fn mark_running(record: &mut TaskRecord, start: &AttemptStart) {
    record.status = Status::Running;
    record.start_time = Some(start.start_time);
    record.attempt = start.attempt;
    record.component_digest = Some(start.component_digest.clone());
    record.component_version = Some(start.component_version);
    record.host_id = Some(start.host_id.clone());
    record.error_message = None;
    record.end_time = None;
    record.component_wait_start = None;
}

/// Returns the number of the attempt a delivery begins: one more than the last attempt
/// that began. The dequeue count is not used, because it also counts deliveries that only
/// waited for a component and restarts when a dead letter is requeued.
fn next_attempt(record: &TaskRecord) -> u32 {
    record.attempt.saturating_add(1)
}

/// Returns the attempts that began after the last one with a recorded outcome. Their
/// workers stopped during them, for example because the host was killed.
fn lost_attempts(record: &TaskRecord) -> u32 {
    let last_recorded = record
        .attempt_history
        .last()
        .map_or(0, |entry| entry.attempt);
    record.attempt.saturating_sub(last_recorded)
}

/// Describes the record's attempt for an error message: "attempt 2 of 3", with the count
/// toward the retry policy when an interrupted attempt makes it differ. An attempt that
/// began once the policy's attempts were used up, as after `bgw requeue`, is called an
/// extra one, so that "attempt 4 of 3" does not read as a miscount.
fn describe_attempt(record: &TaskRecord, max_attempts: u32) -> String {
    let counted = counted_attempts(record);
    if counted > max_attempts {
        let policy = match max_attempts {
            1 => "1 attempt".to_owned(),
            _ => format!("{max_attempts} attempts"),
        };
        return format!(
            "attempt {} (an extra one beyond the retry policy's {policy})",
            record.attempt
        );
    }
    match counted == record.attempt {
        true => format!("attempt {} of {max_attempts}", record.attempt),
        false => format!(
            "attempt {} ({counted} of {max_attempts} that count toward the retry policy)",
            record.attempt
        ),
    }
}

/// Returns the attempts that count toward the retry policy: every attempt that began, less
/// those that a shutdown interrupted.
fn counted_attempts(record: &TaskRecord) -> u32 {
    let interrupted = record
        .attempt_history
        .iter()
        .filter(|entry| entry.interrupted)
        .count();
    record
        .attempt
        .saturating_sub(u32::try_from(interrupted).unwrap_or(u32::MAX))
}

/// Returns when a message was leased, on the queue's clock: the time until which the lease
/// hides it, less the visibility timeout. Two such times of one message are compared
/// without any host's clock, so a skewed host still counts the right time. On Azure they
/// are whole seconds.
fn leased_at(lease: &Lease, visibility: Duration) -> DateTime<Utc> {
    let visibility = chrono::TimeDelta::from_std(visibility).unwrap_or(chrono::TimeDelta::MAX);
    lease
        .visible_at
        .checked_sub_signed(visibility)
        .unwrap_or(lease.inserted_at)
}

/// Returns how long a task has waited for a component when a delivery leased at
/// `leased_at` looks at it: the time since the lease of the first look, which the record
/// keeps. At the first look the record takes `leased_at` as the start.
fn component_wait(record: &mut TaskRecord, leased_at: DateTime<Utc>) -> Duration {
    let start = *record.component_wait_start.get_or_insert(leased_at);
    (leased_at - start).to_std().unwrap_or(Duration::ZERO)
}

/// Formats a guest's own error value for the record.
fn describe_guest_error(error: &TaskError) -> String {
    match error {
        TaskError::InvalidInput(message) => format!("invalid input: {message}"),
        TaskError::Failed(message) => format!("failed: {message}"),
        TaskError::Retryable(message) => format!("retryable error: {message}"),
    }
}

/// Time a cancelled task's guest gets to stop by itself before it is interrupted.
pub const CANCEL_GRACE: Duration = Duration::from_secs(5);

/// Interval between checks for a cancellation request of a running task.
const CANCEL_POLL: Duration = Duration::from_millis(250);

/// State that the keep-alive task and the sandbox share for one running attempt.
#[derive(Clone)]
struct AttemptWatch {
    /// Set when a cancellation was requested; the guest reads it through `is-cancelled`.
    cancelled: Arc<AtomicBool>,
    /// Cancelled to stop the attempt at once.
    interrupt: CancellationToken,
    /// Latest progress reported by the guest.
    progress: Arc<Mutex<Option<(u8, String)>>>,
}

impl AttemptWatch {
    fn new(interrupt: CancellationToken) -> Self {
        AttemptWatch {
            cancelled: Arc::new(AtomicBool::new(false)),
            interrupt,
            progress: Arc::new(Mutex::new(None)),
        }
    }
}

/// Runs an attempt and polls its keep-alive in the same task, so that a short attempt costs
/// no spawned task. When the attempt ends, the keep-alive is stopped at its next pause and
/// awaited. A lease extension already sent is then never abandoned, because the outcome
/// must be stored with the receipt that the extension returns.
async fn run_beside_keep_alive<T>(
    run: impl Future<Output = T>,
    keep_alive: impl Future<Output = ()>,
    stop: &CancellationToken,
) -> T {
    tokio::pin!(run);
    tokio::pin!(keep_alive);
    let mut keep_alive_ended = false;
    let output = loop {
        tokio::select! {
            biased;
            output = &mut run => break output,
            () = &mut keep_alive, if !keep_alive_ended => keep_alive_ended = true,
        }
    };
    if !keep_alive_ended {
        stop.cancel();
        keep_alive.await;
    }
    output
}

/// Keeps a running attempt's lease alive and its record current until `stop` is cancelled.
///
/// Every third of the visibility timeout it extends the lease with the newest receipt and
/// stores new progress. A cancellation request sets the guest's flag at once and becomes
/// an interrupt after [`CANCEL_GRACE`]. `stop` is only looked at between these steps.
async fn keep_alive(
    backend: Arc<dyn Backend>,
    lease: Arc<Mutex<Lease>>,
    watch: AttemptWatch,
    stop: CancellationToken,
    resource_id: String,
    task_id: String,
    visibility: Duration,
) {
    let renew_every = (visibility / 3).max(CANCEL_POLL);
    let mut last_renewal = tokio::time::Instant::now();
    let mut last_progress = None;
    let mut cancel_seen_at: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(CANCEL_POLL) => {}
        }

        if last_renewal.elapsed() >= renew_every {
            let held = lease.lock().unwrap_or_else(|e| e.into_inner()).clone();
            match backend.extend(&held, visibility).await {
                Ok(Some(renewed)) => {
                    *lease.lock().unwrap_or_else(|e| e.into_inner()) = renewed;
                    last_renewal = tokio::time::Instant::now();
                }
                Ok(None) => {
                    // Another worker owns the task now: stop this attempt, whose outcome
                    // could not be stored anyway.
                    tracing::warn!(task_id = %task_id, "lease lost while the task runs: interrupting the attempt");
                    watch.interrupt.cancel();
                    return;
                }
                Err(error) => {
                    tracing::warn!(task_id = %task_id, %error, "failed to extend the lease")
                }
            }

            let latest = watch
                .progress
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            if let Some((percent, message)) = latest.clone().filter(|_| latest != last_progress) {
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

        match cancel_seen_at {
            None => match backend.cancel_requested(&resource_id, &task_id).await {
                Ok(true) => {
                    tracing::info!(task_id = %task_id, grace_secs = CANCEL_GRACE.as_secs(), "cancellation requested: the guest sees is-cancelled");
                    watch.cancelled.store(true, Ordering::Relaxed);
                    cancel_seen_at = Some(tokio::time::Instant::now());
                }
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(task_id = %task_id, %error, "failed to check for cancellation")
                }
            },
            Some(seen) if seen.elapsed() >= CANCEL_GRACE => {
                tracing::info!(task_id = %task_id, "cancellation grace period over: interrupting the guest");
                watch.interrupt.cancel();
            }
            Some(_) => {}
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

#[cfg(test)]
mod tests {
    use super::*;

    fn lease_at(inserted_after_secs: i64, visible_after_secs: i64) -> Lease {
        let epoch = chrono::DateTime::from_timestamp(0, 0).expect("the epoch is a valid time");
        Lease {
            message_id: "m".to_owned(),
            pop_receipt: "p".to_owned(),
            dequeue_count: 1,
            body: String::new(),
            inserted_at: epoch + chrono::TimeDelta::seconds(inserted_after_secs),
            visible_at: epoch + chrono::TimeDelta::seconds(visible_after_secs),
            held_until: std::time::Instant::now(),
        }
    }

    #[test]
    fn options_out_of_range_are_rejected() {
        let cases = [
            (0, Duration::from_secs(30), "invalid concurrency 0"),
            (
                MAX_CONCURRENCY + 1,
                Duration::from_secs(30),
                "invalid concurrency 1025",
            ),
            (1, Duration::ZERO, "invalid visibility timeout of 0 ms"),
            (1, Duration::MAX, "at most 604800 s"),
        ];
        for (concurrency, visibility_timeout, expected) in cases {
            let options = DaemonOptions {
                concurrency,
                visibility_timeout,
                ..DaemonOptions::default()
            };
            match check_options(&options, None) {
                Err(crate::Error::Invalid(message)) => {
                    assert!(message.contains(expected), "{message}")
                }
                other => panic!("{concurrency}, {visibility_timeout:?}: {other:?}"),
            }
        }
        assert!(check_options(&DaemonOptions::default(), None).is_ok());
    }

    #[test]
    fn concurrency_above_pool_size_is_rejected() {
        let options = DaemonOptions {
            concurrency: 300,
            ..DaemonOptions::default()
        };
        match check_options(&options, Some(256)) {
            Err(crate::Error::Invalid(message)) => assert!(
                message.contains(
                    "invalid concurrency 300: the sandbox's instance pool has only 256 slots"
                ),
                "{message}"
            ),
            other => panic!("expected Error::Invalid, got {other:?}"),
        }
        assert!(check_options(&options, Some(300)).is_ok());
        assert!(check_options(&options, None).is_ok());
    }

    #[test]
    fn lost_attempts_count_from_last_outcome() {
        let mut record = TaskRecord::new("t", "r", "a", "{}");
        assert_eq!(lost_attempts(&record), 0, "a new task");
        assert_eq!(next_attempt(&record), 1);

        // Attempt 1 failed and was recorded, then the workers of attempts 2 and 3 stopped.
        record.attempt = 1;
        record.attempt_history.push(record.current_attempt());
        record.attempt = 3;
        assert_eq!(lost_attempts(&record), 2);
        assert_eq!(next_attempt(&record), 4);

        // The entry of a lost attempt that ends the task resets the count, for a requeue.
        record.attempt_history.push(record.current_attempt());
        assert_eq!(lost_attempts(&record), 0);
    }

    #[test]
    fn interrupted_attempts_do_not_count() {
        let mut record = TaskRecord::new("t", "r", "a", "{}");
        record.attempt = 1;
        let mut interrupted = record.current_attempt();
        interrupted.interrupted = true;
        record.attempt_history.push(interrupted);
        record.attempt = 2;
        record.attempt_history.push(record.current_attempt());

        assert_eq!(counted_attempts(&record), 1);
        assert_eq!(next_attempt(&record), 3);
    }

    #[test]
    fn attempt_descriptions_follow_retry_policy() {
        // (attempts, the numbers of the interrupted ones, max attempts, description)
        let cases: [(u32, &[u32], u32, &str); 6] = [
            (2, &[], 3, "attempt 2 of 3"),
            (3, &[], 3, "attempt 3 of 3"),
            (
                3,
                &[1],
                3,
                "attempt 3 (2 of 3 that count toward the retry policy)",
            ),
            (
                4,
                &[],
                3,
                "attempt 4 (an extra one beyond the retry policy's 3 attempts)",
            ),
            (
                2,
                &[],
                1,
                "attempt 2 (an extra one beyond the retry policy's 1 attempt)",
            ),
            (
                5,
                &[2],
                3,
                "attempt 5 (an extra one beyond the retry policy's 3 attempts)",
            ),
        ];
        for (attempts, interrupted, max_attempts, expected) in cases {
            let mut record = TaskRecord::new("t", "r", "a", "{}");
            for attempt in 1..=attempts {
                record.attempt = attempt;
                let mut entry = record.current_attempt();
                entry.interrupted = interrupted.contains(&attempt);
                record.attempt_history.push(entry);
            }
            assert_eq!(describe_attempt(&record, max_attempts), expected);
        }
    }

    #[test]
    fn component_wait_counts_from_first_look() {
        let visibility = Duration::from_secs(30);
        let mut record = TaskRecord::new("t", "r", "a", "{}");

        // Enqueued at 100 s with a delay, first looked at when leased at 140 s.
        let first = leased_at(&lease_at(100, 170), visibility);
        assert_eq!(component_wait(&mut record, first), Duration::ZERO);
        assert_eq!(record.component_wait_start, Some(first));

        let later = leased_at(&lease_at(100, 175), visibility);
        assert_eq!(component_wait(&mut record, later), Duration::from_secs(5));
        assert_eq!(record.component_wait_start, Some(first), "the start stays");

        // Azure rounds lease times to whole seconds, so a look can seem to come first.
        let earlier = leased_at(&lease_at(100, 169), visibility);
        assert_eq!(component_wait(&mut record, earlier), Duration::ZERO);
    }
}

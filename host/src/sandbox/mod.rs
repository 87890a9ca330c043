//! The sandbox: one wasmtime engine, and a fresh store and instance for every attempt.
//!
//! Limits enforced per attempt:
//! - fuel: a budget of wasm instructions, charged for work done before a trap or the
//!   deadline too;
//! - memory: a cap on linear memory growth, reported by the store's limiter;
//! - stack: the engine's maximum wasm stack;
//! - wall clock: an epoch deadline stops busy loops, and a tokio timeout around the whole
//!   call stops a guest blocked inside a host call (an epoch check runs only in wasm code).
//!
//! A guest has WASI for the Rust standard library but no preopened directory, no
//! environment, no arguments, no sockets and no stdin. Its stdout and stderr are captured,
//! bounded, into the task log.

mod host_api;
mod output;

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Config, Engine, Store, StoreLimits, Trap, UpdateDeadline};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::backend::{instant_after, BlobWriter, Limits, ReadAt};
pub use host_api::bindings::bgw::activity::types::{LogLevel, TaskError};
use host_api::bindings::{Activity, ActivityPre};
pub use output::BoundedText;

/// Interval of the engine's epoch ticker: the resolution of wall-clock deadlines.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Bytes of stdout, stderr and log lines kept per attempt; the rest is counted and dropped.
pub const MAX_LOG_BYTES: usize = 64 * 1024;

/// Maximum result size a guest may return, in bytes.
pub const MAX_RESULT_BYTES: usize = 1024 * 1024;

/// Fuel injected into a running guest at a time, in units.
///
/// Compiled wasm keeps its fuel count in a register and writes it back to the store only
/// at calls, returns and traps. The epoch check that stops a busy loop at its deadline
/// does not write it back, so without slices the store would still hold the count from
/// before the loop. Once a slice is used up, wasmtime (48) writes the count back, takes
/// the next slice from the budget and yields to tokio. So the fuel read after a deadline
/// is short by less than one slice. A spinning guest burned about 1.8e9 units per second
/// on a 2-core virtual machine, which makes about 180 extra yields per second.
const FUEL_SLICE: u64 = 10_000_000;

/// Engine-wide settings, fixed when the host starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EngineSettings {
    /// Maximum wasm stack of one call, in bytes.
    pub max_wasm_stack: usize,
    /// Stack of the fiber each async call runs on, in bytes. Must exceed `max_wasm_stack`
    /// so that host functions called near the wasm stack limit still have room.
    pub async_stack_size: usize,
    /// Instances the pooling allocator keeps slots for: attempts that can run at once. A
    /// daemon's concurrency may not exceed it. Each slot reserves about 8 GiB of address
    /// space, which stays virtual until an attempt touches it. 0 selects the on-demand
    /// allocator, which maps memory for every attempt.
    pub pooled_instances: u32,
}

impl Default for EngineSettings {
    fn default() -> Self {
        EngineSettings {
            max_wasm_stack: 1024 * 1024,
            async_stack_size: 2 * 1024 * 1024 + 512 * 1024,
            pooled_instances: 256,
        }
    }
}

/// The engine, its linker and the epoch ticker. One per process.
pub struct Sandbox {
    engine: Engine,
    linker: Linker<TaskState>,
    settings: EngineSettings,
    /// Instance slots of the pooling allocator, or `None` when the engine uses the on-demand
    /// allocator, because the settings select it or the pool could not be reserved.
    pool_size: Option<u32>,
    engine_hash: String,
}

impl Sandbox {
    /// Builds the engine and starts the epoch ticker thread.
    pub fn new(settings: EngineSettings) -> anyhow::Result<Arc<Self>> {
        if settings.max_wasm_stack + 256 * 1024 > settings.async_stack_size {
            anyhow::bail!(
                "invalid stack settings: the wasm stack limit of {} bytes needs an async stack of at least {} bytes, but it is {} bytes",
                settings.max_wasm_stack,
                settings.max_wasm_stack + 256 * 1024,
                settings.async_stack_size
            );
        }

        let mut config = Config::new();
        config
            .consume_fuel(true)
            .epoch_interruption(true)
            .max_wasm_stack(settings.max_wasm_stack)
            .async_stack_size(settings.async_stack_size)
            .cranelift_opt_level(wasmtime::OptLevel::Speed);
        let mut pool_size = (settings.pooled_instances > 0).then_some(settings.pooled_instances);
        if let Some(instances) = pool_size {
            config.allocation_strategy(pooling_config(instances));
        }
        let engine = match Engine::new(&config) {
            Ok(engine) => engine,
            Err(error) if pool_size.is_some() => {
                // The pool reserves address space up front, which a low `ulimit -v` forbids.
                tracing::warn!(%error, "pooling allocator unavailable, using the on-demand allocator");
                config.allocation_strategy(wasmtime::InstanceAllocationStrategy::OnDemand);
                pool_size = None;
                Engine::new(&config)
                    .map_err(anyhow::Error::from)
                    .context("failed to create the wasmtime engine")?
            }
            Err(error) => {
                return Err(
                    anyhow::Error::from(error).context("failed to create the wasmtime engine")
                )
            }
        };

        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(anyhow::Error::from)
            .context("failed to add WASI to the linker")?;
        Activity::add_to_linker::<_, wasmtime::component::HasSelf<TaskState>>(
            &mut linker,
            |state| state,
        )
        .map_err(anyhow::Error::from)
        .context("failed to add the bgw host interface to the linker")?;

        let engine_hash = {
            use std::hash::{Hash, Hasher};
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            engine.precompile_compatibility_hash().hash(&mut hasher);
            format!("{:016x}", hasher.finish())
        };

        start_epoch_ticker(&engine);
        Ok(Arc::new(Sandbox {
            engine,
            linker,
            settings,
            pool_size,
            engine_hash,
        }))
    }

    /// Hash of the engine configuration; compiled artifacts are only valid for the same hash.
    pub fn engine_hash(&self) -> &str {
        &self.engine_hash
    }

    /// Engine-wide settings.
    pub fn settings(&self) -> EngineSettings {
        self.settings
    }

    /// Returns the number of attempts that the pooling allocator has slots for, or `None`
    /// when the engine uses the on-demand allocator, which has no such limit.
    pub fn pool_size(&self) -> Option<u32> {
        self.pool_size
    }

    /// Checks that `wasm` is a component of the activity world and compiles it.
    /// Returns the prepared component and its compiled artifact.
    pub fn compile(&self, wasm: &[u8]) -> Result<(PreparedComponent, Vec<u8>), String> {
        check_component_header(wasm)?;
        let artifact = self
            .engine
            .precompile_component(wasm)
            .map_err(|error| format!("invalid component: {error:#}"))?;
        let prepared = self.load_artifact(&artifact)?;
        Ok((prepared, artifact))
    }

    /// Loads a compiled artifact made by `compile` with an engine of the same hash.
    pub fn load_artifact(&self, artifact: &[u8]) -> Result<PreparedComponent, String> {
        // SAFETY: artifacts are produced by `precompile_component` of an engine with the same
        // configuration and are read only from the registry's own directory.
        let component = unsafe { Component::deserialize(&self.engine, artifact) }
            .map_err(|error| format!("invalid compiled artifact: {error:#}"))?;
        self.prepare(component)
    }

    fn prepare(&self, component: Component) -> Result<PreparedComponent, String> {
        let instance_pre = self.linker.instantiate_pre(&component).map_err(|error| {
            format!(
                "component does not fit world bgw:activity/activity@0.1.0: {error:#} (a guest may import only bgw:activity/host and WASI 0.2 interfaces)"
            )
        })?;
        let pre = ActivityPre::new(instance_pre).map_err(|error| {
            format!(
                "component does not fit world bgw:activity/activity@0.1.0: {error:#} (it must export `run: func(task: task-info, payload: string) -> result<string, task-error>`)"
            )
        })?;
        Ok(PreparedComponent { pre })
    }

    /// Runs one attempt in a fresh store. Traps, limits and guest errors end up in the
    /// returned report, not in a panic.
    ///
    /// When the pooling allocator has no free slot for the instance or its stack, the
    /// attempt waits for one, polling every [`EPOCH_TICK`] until another attempt frees a
    /// slot or `task.interrupt` is cancelled. That wait is the host's, so the guest is not
    /// charged for it: the deadline and the fuel budget start with the call that gets a
    /// slot.
    pub async fn run(
        &self,
        component: &PreparedComponent,
        task: TaskContext,
        limits: Limits,
    ) -> AttemptReport {
        let started = Instant::now();
        let stdout = BoundedText::new(MAX_LOG_BYTES);
        let stderr = BoundedText::new(MAX_LOG_BYTES);
        let wasi = WasiCtxBuilder::new()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let interrupt = task.interrupt.clone();
        let task_deadline = task.deadline;
        let mut state = TaskState::new(task, wasi, limits, self.settings.max_wasm_stack);

        let mut waited_for_pool = false;
        let (state, fuel_used, call) = loop {
            let deadline = Deadline::of_call(limits, task_deadline);
            let (returned, fuel_used, call) = self
                .call(component, state, limits, deadline, &interrupt)
                .await;
            if !matches!(&call, Call::Failed(error) if is_pool_full(error)) {
                break (returned, fuel_used, call);
            }
            if !waited_for_pool {
                tracing::warn!(
                    pooled_instances = self.settings.pooled_instances,
                    "instance pool full: the attempt waits for a slot"
                );
                waited_for_pool = true;
            }
            state = returned;
            tokio::select! {
                () = tokio::time::sleep(EPOCH_TICK) => {}
                () = interrupt.cancelled() => break (state, 0, Call::Interrupted),
            }
        };
        if waited_for_pool {
            tracing::debug!(
                waited_ms = started.elapsed().as_millis() as u64,
                "the attempt left the wait for an instance pool slot"
            );
        }

        let outcome = match call {
            Call::Returned(Ok(result)) => Outcome::Completed(result),
            Call::Returned(Err(error)) => Outcome::GuestError(error),
            Call::Failed(error) => Outcome::Trapped(classify_trap(&error, &state, &stderr, limits)),
            Call::PastDeadline(fault) => Outcome::Trapped(fault),
            Call::Interrupted => Outcome::Interrupted,
        };
        let task_log = state.log_text(&stdout, &stderr);
        AttemptReport {
            outcome,
            fuel_used,
            duration: started.elapsed(),
            task_log,
            output: state.output,
        }
    }

    /// Instantiates the component in a new store that owns `state` and calls its `run`
    /// export under the fuel budget and the deadline. Returns the state, for the output and
    /// the log or for another call after the instance pool was full, and the fuel used.
    async fn call(
        &self,
        component: &PreparedComponent,
        state: TaskState,
        limits: Limits,
        deadline: Deadline,
        interrupt: &CancellationToken,
    ) -> (TaskState, u64, Call) {
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| &mut state.limits);
        let _ = store.set_fuel(limits.fuel);
        let _ = store.fuel_async_yield_interval(Some(FUEL_SLICE));

        let deadline_at = deadline.at;
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |_| {
            if Instant::now() >= deadline_at {
                Err(wasmtime::Error::new(DeadlineExceeded))
            } else {
                Ok(UpdateDeadline::Yield(1))
            }
        });

        let info = store.data().info.clone();
        let payload = std::mem::take(&mut store.data_mut().payload);
        let call = async {
            let instance = component.pre.instantiate_async(&mut store).await?;
            instance.call_run(&mut store, &info, &payload).await
        };
        // The epoch check runs only in wasm code, so a guest blocked in a host call is
        // stopped by this timeout, two ticks after the deadline.
        let left = deadline_at.saturating_duration_since(Instant::now());
        let timed = tokio::time::timeout(left.saturating_add(EPOCH_TICK * 2), call);
        let call = tokio::select! {
            finished = timed => match finished {
                Ok(Ok(returned)) => Call::Returned(returned),
                Ok(Err(error)) if is_deadline(&error) => Call::PastDeadline(deadline.fault),
                Ok(Err(error)) => Call::Failed(error),
                Err(_elapsed) => Call::PastDeadline(deadline.fault),
            },
            () = interrupt.cancelled() => Call::Interrupted,
        };
        // Read after the call ends, also after a trap or a timeout, so that work done
        // before them is charged.
        let remaining = store.get_fuel().unwrap_or(0);
        let mut state = store.into_data();
        state.payload = payload;
        (state, limits.fuel.saturating_sub(remaining), call)
    }
}

/// Outcome of one call of a guest's `run` export.
enum Call {
    /// The guest returned its result or its own error value.
    Returned(Result<String, TaskError>),
    /// Instantiation or the call failed: a trap, a limit or a full instance pool.
    Failed(wasmtime::Error),
    /// The call ran past its deadline, and the fault names the deadline that stopped it.
    PastDeadline(FaultKind),
    /// The controller cancelled `TaskContext::interrupt`.
    Interrupted,
}

/// The wall-clock limit of one call: the activity's timeout counted from the call's start,
/// or the task's own deadline when that comes first.
struct Deadline {
    at: Instant,
    /// The fault that a call stopped at `at` reports.
    fault: FaultKind,
}

impl Deadline {
    fn of_call(limits: Limits, task_deadline: Option<Instant>) -> Deadline {
        let timeout_at = instant_after(Duration::from_secs(limits.timeout_secs.max(1)));
        match task_deadline {
            Some(at) if at < timeout_at => Deadline {
                at,
                fault: FaultKind::TaskDeadline,
            },
            _ => Deadline {
                at: timeout_at,
                fault: FaultKind::Deadline {
                    seconds: limits.timeout_secs,
                },
            },
        }
    }
}

/// Returns true when the epoch check stopped a call at its deadline.
fn is_deadline(error: &wasmtime::Error) -> bool {
    error.downcast_ref::<DeadlineExceeded>().is_some()
        || matches!(error.downcast_ref::<Trap>(), Some(Trap::Interrupt))
}

/// Returns true when an instantiation failed because the pooling allocator had no free
/// slot for an instance, a memory, a table or a stack.
fn is_pool_full(error: &wasmtime::Error) -> bool {
    error
        .downcast_ref::<wasmtime::PoolConcurrencyLimitError>()
        .is_some()
}

/// A component compiled and linked, ready to instantiate for each attempt.
#[derive(Clone)]
pub struct PreparedComponent {
    pre: ActivityPre<TaskState>,
}

/// Data that one attempt of a task may reach.
pub struct TaskContext {
    pub task_id: String,
    pub resource_id: String,
    pub activity_type: String,
    pub attempt: u32,
    pub payload: String,
    /// The input blob and its size, when the task has one.
    pub input: Option<(Box<dyn ReadAt>, u64)>,
    /// Opens the output blob on the first write.
    pub open_output: Box<dyn FnMut() -> anyhow::Result<Box<dyn BlobWriter>> + Send>,
    /// Set by the controller when the task is cancelled; the guest reads it through
    /// `is-cancelled`.
    pub cancelled: Arc<AtomicBool>,
    /// Cancelled by the controller to stop the attempt at once: after a cancellation's
    /// grace period, or when the daemon stops.
    pub interrupt: CancellationToken,
    /// Latest progress reported by the guest.
    pub progress: Arc<Mutex<Option<(u8, String)>>>,
    /// Bytes written to the output blob so far.
    pub output_written: Arc<AtomicU64>,
    /// The task's own deadline on this host's monotonic clock. The attempt stops there,
    /// to within two epoch ticks, when that comes before the activity's timeout.
    pub deadline: Option<Instant>,
}

/// Per-store state: the task's own data and the WASI context with nothing granted.
pub struct TaskState {
    info: host_api::bindings::bgw::activity::types::TaskInfo,
    payload: String,
    input: Option<(Box<dyn ReadAt>, u64)>,
    open_output: Box<dyn FnMut() -> anyhow::Result<Box<dyn BlobWriter>> + Send>,
    output: Option<Box<dyn BlobWriter>>,
    output_written: Arc<AtomicU64>,
    max_output_bytes: u64,
    cancelled: Arc<AtomicBool>,
    progress: Arc<Mutex<Option<(u8, String)>>>,
    log: BoundedText,
    limits: StoreLimits,
    memory_cap: u64,
    stack_limit: usize,
    wasi: WasiCtx,
    table: ResourceTable,
}

impl TaskState {
    fn new(task: TaskContext, wasi: WasiCtx, limits: Limits, stack_limit: usize) -> Self {
        let memory_cap = limits.memory_mib.saturating_mul(1024 * 1024);
        TaskState {
            info: host_api::bindings::bgw::activity::types::TaskInfo {
                task_id: task.task_id,
                resource_id: task.resource_id,
                activity_type: task.activity_type,
                attempt: task.attempt,
            },
            payload: task.payload,
            input: task.input,
            open_output: task.open_output,
            output: None,
            output_written: task.output_written,
            max_output_bytes: limits.max_output_bytes,
            cancelled: task.cancelled,
            progress: task.progress,
            log: BoundedText::new(MAX_LOG_BYTES),
            limits: wasmtime::StoreLimitsBuilder::new()
                .memory_size(usize::try_from(memory_cap).unwrap_or(usize::MAX))
                .table_elements(1_000_000)
                .instances(64)
                .trap_on_grow_failure(true)
                .build(),
            memory_cap,
            stack_limit,
            wasi,
            table: ResourceTable::new(),
        }
    }

    fn log_text(&self, stdout: &BoundedText, stderr: &BoundedText) -> String {
        let mut text = self.log.text();
        for (name, stream) in [("stdout", stdout), ("stderr", stderr)] {
            let captured = stream.text();
            if !captured.is_empty() {
                text.push_str(&format!("--- {name} ---\n{captured}"));
                if !captured.ends_with('\n') {
                    text.push('\n');
                }
            }
        }
        text
    }
}

impl WasiView for TaskState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Outcome of an attempt.
#[derive(Debug)]
pub enum Outcome {
    /// The guest returned a result (a JSON string, not yet validated).
    Completed(String),
    /// The guest returned its own error value.
    GuestError(TaskError),
    /// The attempt was stopped by a limit or a trap.
    Trapped(FaultKind),
    /// The controller stopped the attempt through `TaskContext::interrupt`.
    Interrupted,
}

/// Cause of a stopped attempt.
#[derive(Clone, Debug, PartialEq)]
pub enum FaultKind {
    OutOfFuel {
        fuel: u64,
    },
    /// The activity's timeout, in whole seconds, ended the attempt.
    Deadline {
        seconds: u64,
    },
    /// The task's own deadline ended the attempt before the activity's timeout.
    TaskDeadline,
    Memory {
        limit_mib: u64,
    },
    StackOverflow {
        limit_bytes: usize,
    },
    Panic {
        message: String,
    },
    Trap {
        message: String,
    },
    Host {
        message: String,
    },
}

impl FaultKind {
    /// Returns the task error message, naming the limit and its value where one was hit.
    pub fn message(&self) -> String {
        match self {
            FaultKind::OutOfFuel { fuel } => format!(
                "fuel limit exceeded: the guest used all {fuel} units of fuel (limit `fuel`, set with `bgw register --fuel`)"
            ),
            FaultKind::Deadline { seconds } => format!(
                "deadline exceeded: the attempt ran longer than {seconds} s (limit `timeout`, set with `bgw register --timeout`)"
            ),
            FaultKind::TaskDeadline => "deadline exceeded: the task's own deadline (set with `bgw submit --deadline`) passed while the attempt ran".to_owned(),
            FaultKind::Memory { limit_mib } => format!(
                "memory limit exceeded: the guest tried to grow its memory past {limit_mib} MiB (limit `memory`, set with `bgw register --memory`)"
            ),
            FaultKind::StackOverflow { limit_bytes } => format!(
                "stack overflow: the guest exceeded the wasm stack limit of {limit_bytes} bytes"
            ),
            FaultKind::Panic { message } => format!("guest panicked: {message}"),
            FaultKind::Trap { message } => format!("guest trapped: {message}"),
            FaultKind::Host { message } => format!("host error while running the guest: {message}"),
        }
    }

    /// Returns true when another attempt might succeed. After the task's own deadline,
    /// none may start.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, FaultKind::Host { .. } | FaultKind::TaskDeadline)
    }
}

/// Everything the controller needs to record about one attempt.
pub struct AttemptReport {
    pub outcome: Outcome,
    pub fuel_used: u64,
    pub duration: Duration,
    pub task_log: String,
    /// The output blob, not yet committed, when the guest wrote one.
    pub output: Option<Box<dyn BlobWriter>>,
}

/// Marker error of the epoch deadline callback.
#[derive(Debug)]
struct DeadlineExceeded;

impl std::fmt::Display for DeadlineExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("wall-clock deadline exceeded")
    }
}

impl std::error::Error for DeadlineExceeded {}

fn classify_trap(
    error: &wasmtime::Error,
    state: &TaskState,
    stderr: &BoundedText,
    limits: Limits,
) -> FaultKind {
    if let Some(trap) = error.downcast_ref::<Trap>() {
        match trap {
            Trap::OutOfFuel => return FaultKind::OutOfFuel { fuel: limits.fuel },
            Trap::StackOverflow => {
                return FaultKind::StackOverflow {
                    limit_bytes: state.stack_limit,
                }
            }
            Trap::UnreachableCodeReached => {
                if let Some(message) = panic_message(&stderr.text(), &state.log.text()) {
                    return FaultKind::Panic { message };
                }
            }
            _ => {}
        }
        return FaultKind::Trap {
            message: format!("{trap}"),
        };
    }

    let text = format!("{error:#}");
    if text.contains("forcing trap when growing memory") {
        return FaultKind::Memory {
            limit_mib: state.memory_cap / (1024 * 1024),
        };
    }
    if let Some(message) = panic_message(&stderr.text(), &state.log.text()) {
        return FaultKind::Panic { message };
    }
    FaultKind::Trap { message: text }
}

/// Extracts a Rust panic message from the guest's stderr ("panicked at FILE:LINE:COL:\nMESSAGE").
fn panic_message(stderr: &str, log: &str) -> Option<String> {
    for text in [stderr, log] {
        if let Some(at) = text.find("panicked at ") {
            let rest = &text[at..];
            let mut lines = rest.lines();
            let location = lines.next().unwrap_or_default().trim_end_matches(':');
            let message: Vec<&str> = lines
                .take_while(|line| !line.starts_with("note:") && !line.starts_with("---"))
                .collect();
            let message = message.join("\n").trim().to_owned();
            return Some(if message.is_empty() {
                location.to_owned()
            } else {
                format!("{message} ({location})")
            });
        }
    }
    None
}

fn check_component_header(wasm: &[u8]) -> Result<(), String> {
    const MAGIC: &[u8; 4] = b"\0asm";
    if wasm.len() < 8 || &wasm[..4] != MAGIC {
        let leading: Vec<String> = wasm.iter().take(8).map(|b| format!("{b:02x}")).collect();
        return Err(format!(
            "not a WebAssembly file: it starts with bytes [{}] instead of 00 61 73 6d",
            leading.join(" ")
        ));
    }
    match wasm[4..8] {
        [0x0d, 0x00, 0x01, 0x00] => Ok(()),
        [0x01, 0x00, 0x00, 0x00] => Err(
            "a core WebAssembly module, not a component: build the guest with `--target wasm32-wasip2` and the bgw guest SDK".to_owned(),
        ),
        _ => Err(format!(
            "unsupported WebAssembly version or layer: bytes 4..8 are {:02x?}",
            &wasm[4..8]
        )),
    }
}

/// Sizes the pooling allocator for `instances` attempts at once. A Rust guest component
/// has a few core instances, memories and tables, so each attempt gets several of each.
/// Memory slots are reserved at 4 GiB, the most a wasm32 memory can use, so any memory
/// limit an activity sets fits; the reservation is address space, not resident memory.
/// Bytes of each pooled linear memory kept resident between attempts. This bounds the
/// memory that an unused warm slot keeps.
const KEEP_RESIDENT_MEMORY: usize = 1024 * 1024;

/// Bytes of each pooled table kept resident between attempts.
const KEEP_RESIDENT_TABLE: usize = 64 * 1024;

/// Bytes of each pooled async stack kept resident between attempts.
const KEEP_RESIDENT_STACK: usize = 128 * 1024;

fn pooling_config(instances: u32) -> wasmtime::PoolingAllocationConfig {
    let mut pool = wasmtime::PoolingAllocationConfig::new();
    pool.total_component_instances(instances)
        .total_core_instances(instances.saturating_mul(8))
        .total_memories(instances.saturating_mul(2))
        .total_tables(instances.saturating_mul(4))
        .total_stacks(instances)
        .max_component_instance_size(16 * 1024 * 1024)
        .max_core_instance_size(16 * 1024 * 1024)
        .max_memories_per_module(2)
        .max_tables_per_module(4)
        .table_elements(100_000)
        .max_memory_size(4 * 1024 * 1024 * 1024)
        // Reset a slot's dirty pages with memset instead of giving them back with madvise,
        // up to these sizes. madvise made the next attempt fault every page in again, and
        // with two threads each madvise also flushed the other CPU's TLB. The PAGEMAP_SCAN
        // ioctl (Linux 6.7 and later) finds the dirty pages, so small guests reset only
        // what they touched. Without the ioctl, `Auto` resets the lowest addresses.
        .pagemap_scan(wasmtime::Enabled::Auto)
        .linear_memory_keep_resident(KEEP_RESIDENT_MEMORY)
        .table_keep_resident(KEEP_RESIDENT_TABLE)
        .async_stack_keep_resident(KEEP_RESIDENT_STACK);
    pool
}

fn start_epoch_ticker(engine: &Engine) {
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("bgw-epoch".into())
        .spawn(move || loop {
            std::thread::sleep(EPOCH_TICK);
            match weak.upgrade() {
                Some(engine) => engine.increment_epoch(),
                None => break,
            }
        })
        .expect("failed to spawn the epoch ticker thread");
}

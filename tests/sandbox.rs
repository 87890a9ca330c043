//! Sandbox tests: real guest components run directly in the sandbox, without a store.
//! Each hostile behaviour ends in an error that names its limit, and the sandbox keeps
//! running the next task.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bgw::backend::{BlobWriter, Limits, ReadAt};
use bgw::sandbox::{
    AttemptReport, EngineSettings, FaultKind, Outcome, PreparedComponent, Sandbox, TaskContext,
    TaskError,
};
use serde_json::{json, Value};

fn sandbox() -> Arc<Sandbox> {
    static SANDBOX: OnceLock<Arc<Sandbox>> = OnceLock::new();
    SANDBOX
        .get_or_init(|| Sandbox::new(EngineSettings::default()).expect("engine"))
        .clone()
}

fn component(name: &str) -> PreparedComponent {
    static CACHE: OnceLock<Mutex<std::collections::HashMap<String, PreparedComponent>>> =
        OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(found) = cache.lock().unwrap().get(name) {
        return found.clone();
    }
    let (prepared, _) = sandbox()
        .compile(&support::guest_bytes(name))
        .expect("example guest compiles");
    cache
        .lock()
        .unwrap()
        .insert(name.to_owned(), prepared.clone());
    prepared
}

fn limits() -> Limits {
    Limits {
        fuel: 2_000_000_000,
        memory_mib: 64,
        timeout_secs: 5,
        max_output_bytes: 1024 * 1024,
        retry: Default::default(),
    }
}

/// In-memory input blob.
struct MemoryBlob(Vec<u8>);

impl ReadAt for MemoryBlob {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        let start = (offset as usize).min(self.0.len());
        let n = buf.len().min(self.0.len() - start);
        buf[..n].copy_from_slice(&self.0[start..start + n]);
        Ok(n)
    }
}

/// In-memory output blob that records what was committed.
struct MemoryWriter(Arc<Mutex<Vec<u8>>>, Vec<u8>);

impl std::io::Write for MemoryWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.1.extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl BlobWriter for MemoryWriter {
    fn commit(self: Box<Self>) -> bgw::Result<()> {
        *self.0.lock().unwrap() = self.1;
        Ok(())
    }
}

async fn run_with(
    name: &str,
    payload: Value,
    input: Option<Vec<u8>>,
    limits: Limits,
) -> (AttemptReport, Arc<Mutex<Vec<u8>>>) {
    let committed = Arc::new(Mutex::new(Vec::new()));
    let context = task_context(name, payload, input, committed.clone());
    let report = sandbox().run(&component(name), context, limits).await;
    (report, committed)
}

/// Builds the context of a task whose committed output blob lands in `sink`.
fn task_context(
    name: &str,
    payload: Value,
    input: Option<Vec<u8>>,
    sink: Arc<Mutex<Vec<u8>>>,
) -> TaskContext {
    TaskContext {
        task_id: "0190f0e8-0000-7000-8000-000000000001".into(),
        resource_id: "res-1".into(),
        activity_type: name.into(),
        attempt: 1,
        payload: payload.to_string(),
        input: input.map(|bytes| {
            let len = bytes.len() as u64;
            (Box::new(MemoryBlob(bytes)) as Box<dyn ReadAt>, len)
        }),
        open_output: Box::new(move || {
            Ok(Box::new(MemoryWriter(sink.clone(), Vec::new())) as Box<dyn BlobWriter>)
        }),
        cancelled: Arc::new(AtomicBool::new(false)),
        interrupt: tokio_util::sync::CancellationToken::new(),
        progress: Arc::new(Mutex::new(None)),
        output_written: Arc::new(AtomicU64::new(0)),
        deadline: None,
    }
}

async fn run(name: &str, payload: Value) -> AttemptReport {
    run_with(name, payload, None, limits()).await.0
}

fn completed(report: &AttemptReport) -> Value {
    match &report.outcome {
        Outcome::Completed(text) => serde_json::from_str(text).expect("result is JSON"),
        other => panic!(
            "expected a result, got {other:?}\nlog:\n{}",
            report.task_log
        ),
    }
}

fn fault(report: &AttemptReport) -> FaultKind {
    match &report.outcome {
        Outcome::Trapped(kind) => kind.clone(),
        other => panic!("expected a trap, got {other:?}\nlog:\n{}", report.task_log),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multiply_returns_product_and_uses_fuel() {
    let report = run("multiply", json!({"x": 21})).await;
    assert_eq!(completed(&report), json!({"product": 42}));
    assert!(report.fuel_used > 0, "fuel used is recorded");

    let report = run("multiply", json!({"x": 6, "factor": 7})).await;
    assert_eq!(completed(&report), json!({"product": 42}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multiply_rejects_bad_payload_as_invalid_input() {
    let report = run("multiply", json!({"x": "seven"})).await;
    match report.outcome {
        Outcome::GuestError(TaskError::InvalidInput(message)) => {
            assert!(message.contains("invalid type"), "{message}")
        }
        other => panic!("expected invalid input, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spin_is_stopped_by_fuel() {
    let mut limits = limits();
    limits.fuel = 50_000_000;
    let (report, _) = run_with("hostile", json!({"mode": "spin"}), None, limits).await;
    let kind = fault(&report);
    assert_eq!(kind, FaultKind::OutOfFuel { fuel: 50_000_000 });
    assert!(kind.message().contains("fuel limit exceeded"));
    assert!(kind.message().contains("50000000"));
    assert_eq!(report.fuel_used, 50_000_000, "all fuel is charged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spin_is_stopped_by_deadline() {
    let mut limits = limits();
    limits.fuel = u64::MAX / 2;
    limits.timeout_secs = 1;
    let started = Instant::now();
    let (report, _) = run_with("hostile", json!({"mode": "spin"}), None, limits).await;
    assert_eq!(fault(&report), FaultKind::Deadline { seconds: 1 });
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_deadline_stops_spin_to_the_millisecond() {
    let mut limits = limits();
    limits.fuel = u64::MAX / 2;
    limits.timeout_secs = 60;
    let sink = Arc::new(Mutex::new(Vec::new()));
    let mut context = task_context("hostile", json!({"mode": "spin"}), None, sink);
    let started = Instant::now();
    context.deadline = Some(started + Duration::from_millis(1500));
    let report = sandbox().run(&component("hostile"), context, limits).await;
    let elapsed = started.elapsed();
    assert_eq!(fault(&report), FaultKind::TaskDeadline);
    assert!(!FaultKind::TaskDeadline.is_retryable());
    assert!(
        elapsed >= Duration::from_millis(1500),
        "the attempt ran until the deadline: {elapsed:?}"
    );
    // The epoch ticks every 10 ms; the bound leaves room for a slow or shared core.
    assert!(
        elapsed < Duration::from_millis(1800),
        "the attempt stopped at the deadline, not at a whole second: {elapsed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spin_into_deadline_is_charged_its_fuel() {
    let mut limits = limits();
    limits.fuel = 1_000_000_000_000;
    limits.timeout_secs = 1;
    let (report, _) = run_with("hostile", json!({"mode": "spin"}), None, limits).await;
    assert_eq!(fault(&report), FaultKind::Deadline { seconds: 1 });
    // A second of spinning burned 1.5e9 to 1.8e9 units on 2-core virtual machines, and the
    // bound leaves room for a slow or shared core.
    assert!(
        report.fuel_used > 100_000_000,
        "fuel burned before the deadline is charged: {}",
        report.fuel_used
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burn_then_trap_is_charged_its_fuel() {
    let mut limits = limits();
    limits.fuel = 100_000_000_000;
    limits.timeout_secs = 60;
    let (report, _) = run_with("hostile", json!({"mode": "burn-then-trap"}), None, limits).await;
    assert!(
        matches!(fault(&report), FaultKind::Trap { .. }),
        "{:?}",
        report.outcome
    );
    assert!(
        report.fuel_used > 2_000_000_000,
        "fuel burned before the trap is charged: {}",
        report.fuel_used
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sleep_in_wasi_is_stopped_by_deadline() {
    let mut limits = limits();
    limits.timeout_secs = 1;
    let started = Instant::now();
    let (report, _) = run_with(
        "hostile",
        json!({"mode": "sleep", "ms": 60000}),
        None,
        limits,
    )
    .await;
    assert_eq!(fault(&report), FaultKind::Deadline { seconds: 1 });
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_hog_hits_memory_limit() {
    let (report, _) = run_with("hostile", json!({"mode": "memory-hog"}), None, limits()).await;
    let kind = fault(&report);
    assert_eq!(kind, FaultKind::Memory { limit_mib: 64 });
    assert!(kind.message().contains("64 MiB"), "{}", kind.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_recursion_overflows_stack() {
    for mode in ["recurse", "recurse-then-log"] {
        let report = run("hostile", json!({"mode": mode, "depth": 1_000_000})).await;
        let kind = fault(&report);
        assert!(
            matches!(kind, FaultKind::StackOverflow { .. }),
            "{mode}: {kind:?}"
        );
        assert!(kind.message().contains("stack overflow"), "{mode}");
    }
    let report = run("multiply", json!({"x": 1})).await;
    assert_eq!(
        completed(&report),
        json!({"product": 2}),
        "the sandbox still serves"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panic_message_reaches_error() {
    let report = run("hostile", json!({"mode": "panic"})).await;
    let kind = fault(&report);
    assert!(
        kind.message().contains("hostile guest panicked on purpose"),
        "{}",
        kind.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trap_is_reported() {
    let report = run("hostile", json!({"mode": "trap"})).await;
    let kind = fault(&report);
    assert!(matches!(kind, FaultKind::Trap { .. }), "{kind:?}");
    assert!(kind.message().contains("unreachable"), "{}", kind.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_sees_no_files_env_or_network() {
    let report = run(
        "hostile",
        json!({"mode": "read-file", "path": "/etc/passwd"}),
    )
    .await;
    assert_eq!(completed(&report)["ok"], json!(false));

    let report = run("hostile", json!({"mode": "read-env"})).await;
    assert_eq!(completed(&report)["vars"], json!({}));

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let report = run("hostile", json!({"mode": "connect", "addr": addr})).await;
    assert_eq!(completed(&report)["ok"], json!(false));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_over_limit_is_rejected() {
    let mut limits = limits();
    limits.max_output_bytes = 1000;
    let (report, _) = run_with(
        "hostile",
        json!({"mode": "write-output", "bytes": 5000}),
        None,
        limits,
    )
    .await;
    let result = completed(&report);
    let error = result["error"].as_str().expect("the write fails");
    assert!(error.contains("1000 bytes"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdout_is_captured_and_bounded() {
    let report = run("hostile", json!({"mode": "stdout", "lines": 100000})).await;
    assert_eq!(completed(&report), json!({"lines": 100000}));
    assert!(report.task_log.contains("--- stdout ---"));
    assert!(report.task_log.contains("more bytes dropped"));
    assert!(report.task_log.len() < 3 * bgw::sandbox::MAX_LOG_BYTES);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn word_count_reads_blob_and_writes_csv() {
    let text = b"the cat and the hat\nThe end\n".to_vec();
    let (report, committed) = run_with("word-count", json!({"top": 2}), Some(text), limits()).await;
    let result = completed(&report);
    assert_eq!(result["total_words"], json!(7));
    assert_eq!(result["top"][0], json!({"word": "the", "count": 3}));
    report.output.expect("an output blob").commit().unwrap();
    let csv = String::from_utf8(committed.lock().unwrap().clone()).unwrap();
    assert!(csv.starts_with("word,count\nthe,3\n"), "{csv}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_and_core_wasm_are_rejected() {
    let error = sandbox().compile(b"not wasm at all").err().unwrap();
    assert!(error.contains("not a WebAssembly file"), "{error}");

    let core_module = b"\0asm\x01\0\0\0";
    let error = sandbox().compile(core_module).err().unwrap();
    assert!(error.contains("core WebAssembly module"), "{error}");

    let mut truncated = support::guest_bytes("multiply");
    truncated.truncate(truncated.len() / 2);
    let error = sandbox().compile(&truncated).err().unwrap();
    assert!(error.contains("invalid component"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_pool_makes_attempt_wait() {
    let settings = EngineSettings {
        pooled_instances: 1,
        ..EngineSettings::default()
    };
    let small = Sandbox::new(settings).expect("engine");
    assert_eq!(small.pool_size(), Some(1));
    let (hostile, _) = small
        .compile(&support::guest_bytes("hostile"))
        .expect("example guest compiles");
    let sleep = |ms: u64| {
        let sink = Arc::new(Mutex::new(Vec::new()));
        task_context("hostile", json!({"mode": "sleep", "ms": ms}), None, sink)
    };

    // The first attempt takes the only slot, so the second waits for it instead of trapping.
    let (first, second) = tokio::join!(
        small.run(&hostile, sleep(500), limits()),
        small.run(&hostile, sleep(10), limits()),
    );
    completed(&first);
    completed(&second);
    assert!(
        second.duration >= Duration::from_millis(400),
        "the second attempt waited for the slot: {:?}",
        second.duration
    );

    // An interrupt ends the wait, and the guest is charged nothing.
    let waiting = sleep(10);
    let interrupt = waiting.interrupt.clone();
    let stop_soon = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        interrupt.cancel();
    };
    let (first, (), second) = tokio::join!(
        small.run(&hostile, sleep(500), limits()),
        stop_soon,
        small.run(&hostile, waiting, limits()),
    );
    completed(&first);
    assert!(
        matches!(second.outcome, Outcome::Interrupted),
        "{:?}",
        second.outcome
    );
    assert_eq!(second.fuel_used, 0);
}

#[test]
fn impossible_stack_settings_are_rejected() {
    let settings = EngineSettings {
        max_wasm_stack: 8 * 1024 * 1024,
        async_stack_size: 1024 * 1024,
        pooled_instances: 0,
    };
    let error = Sandbox::new(settings).err().unwrap().to_string();
    assert!(error.contains("invalid stack settings"), "{error}");
}

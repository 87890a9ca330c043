//! The sandbox ceiling: `Sandbox::run` of a prepared component in a bare loop, with no
//! store, queue or daemon around it.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context as _;
use bgw::sandbox::{EngineSettings, Outcome, PreparedComponent, Sandbox, TaskContext};
use serde_json::{json, Value};

use crate::stats::summarize;

#[derive(clap::Args, Debug)]
pub struct SandboxArgs {
    /// Component to run, e.g. target/wasm32-wasip2/release/multiply.wasm
    #[arg(long, value_name = "FILE")]
    wasm: PathBuf,
    /// Threads running the loop at once, sharing one engine
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Measured runs per thread
    #[arg(long, default_value_t = 20_000)]
    iterations: usize,
    /// Unmeasured runs per thread before the measured ones
    #[arg(long, default_value_t = 500)]
    warmup: usize,
}

/// Runs the loop on each thread and reports the time per run and the total rate.
pub fn run(args: SandboxArgs) -> anyhow::Result<Value> {
    let wasm = std::fs::read(&args.wasm)
        .with_context(|| format!("failed to read {}", args.wasm.display()))?;
    let sandbox = Sandbox::new(EngineSettings::default())?;
    let (component, _artifact) = sandbox
        .compile(&wasm)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("failed to compile {}", args.wasm.display()))?;

    let started = Instant::now();
    let threads: Vec<_> = (0..args.threads.max(1))
        .map(|_| {
            let sandbox = sandbox.clone();
            let component = component.clone();
            let (warmup, iterations) = (args.warmup, args.iterations);
            std::thread::spawn(move || run_thread(&sandbox, &component, warmup, iterations))
        })
        .collect();
    let mut micros = Vec::with_capacity(args.iterations * args.threads);
    for thread in threads {
        let times = thread
            .join()
            .map_err(|_| anyhow::anyhow!("a sandbox thread panicked"))??;
        micros.extend(times);
    }
    let wall = started.elapsed().as_secs_f64();

    let summary = summarize(&micros);
    Ok(json!({
        "threads": args.threads,
        "runs": micros.len(),
        "p50_us": summary.p50,
        "p99_us": summary.p99,
        "max_us": summary.max,
        "rate": micros.len() as f64 / wall,
    }))
}

/// Runs `warmup + iterations` attempts and returns the measured ones in microseconds.
/// The warm-up time counts in the caller's wall clock, so the rate is a slight underestimate.
fn run_thread(
    sandbox: &Sandbox,
    component: &PreparedComponent,
    warmup: usize,
    iterations: usize,
) -> anyhow::Result<Vec<f64>> {
    let runtime = crate::runtime()?;
    let limits = bgw::config::DEFAULT_LIMITS;
    let mut micros = Vec::with_capacity(iterations);
    for index in 0..warmup + iterations {
        let started = Instant::now();
        let report = runtime.block_on(sandbox.run(component, task_context(index), limits));
        let elapsed = started.elapsed();
        if !matches!(report.outcome, Outcome::Completed(_)) {
            anyhow::bail!("run {index} did not complete: {:?}", report.outcome);
        }
        if index >= warmup {
            micros.push(elapsed.as_secs_f64() * 1e6);
        }
    }
    Ok(micros)
}

/// Builds the context the daemon would build for a task without blobs.
fn task_context(index: usize) -> TaskContext {
    TaskContext {
        task_id: format!("0190f0e8-0000-7000-8000-{index:012}"),
        resource_id: "bench".into(),
        activity_type: "multiply".into(),
        attempt: 1,
        payload: r#"{"x":21}"#.into(),
        input: None,
        open_output: Box::new(|| anyhow::bail!("the benchmark task has no output blob")),
        cancelled: Arc::new(AtomicBool::new(false)),
        interrupt: tokio_util::sync::CancellationToken::new(),
        progress: Arc::new(Mutex::new(None)),
        output_written: Arc::new(AtomicU64::new(0)),
        deadline: None,
    }
}

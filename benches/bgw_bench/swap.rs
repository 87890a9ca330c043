//! Hot swap: the time from `bgw register` of a new version returning to the first task
//! that starts on it, while tasks are submitted at a steady rate.

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use crate::latency::paced_run;
use crate::StoreArgs;

#[derive(clap::Args, Debug)]
pub struct SwapArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// The `bgw` binary that runs `register`
    #[arg(long, value_name = "FILE")]
    bgw: PathBuf,
    /// Component of the current version; the new version is this file plus a custom section
    #[arg(long, value_name = "FILE")]
    wasm: PathBuf,
    /// Offered load, in tasks per second
    #[arg(long, default_value_t = 500.0)]
    rate: f64,
    /// Seconds of submission before the registration
    #[arg(long, default_value_t = 1.0)]
    before: f64,
    /// Seconds of submission after the registration started
    #[arg(long, default_value_t = 2.0)]
    after: f64,
}

/// The registration as the driver saw it.
struct Registration {
    returned_at: DateTime<Utc>,
    command_seconds: f64,
    digest: String,
}

pub fn run(args: SwapArgs) -> anyhow::Result<Value> {
    let new_wasm = args.store.data_dir.join("multiply-swap.wasm");
    write_new_version(&args.wasm, &new_wasm)?;
    let client = crate::open_client(&args.store.data_dir)?;

    let registration: Arc<Mutex<Option<anyhow::Result<Registration>>>> = Arc::default();
    let mut register_thread = None;
    let slot = registration.clone();
    let (bgw, data_dir) = (args.bgw.clone(), args.store.data_dir.clone());
    let register_at = Duration::from_secs_f64(args.before);
    let paced = paced_run(
        &client,
        &args.store.resource,
        args.rate,
        args.before + args.after,
        |elapsed| {
            if elapsed >= register_at && register_thread.is_none() {
                let (slot, bgw, data_dir, new_wasm) = (
                    slot.clone(),
                    bgw.clone(),
                    data_dir.clone(),
                    new_wasm.clone(),
                );
                register_thread = Some(std::thread::spawn(move || {
                    let result = register(&bgw, &data_dir, &new_wasm);
                    *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
                }));
            }
        },
    )?;
    if let Some(thread) = register_thread {
        thread
            .join()
            .map_err(|_| anyhow::anyhow!("the register thread panicked"))?;
    }
    let registration = registration
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .context("the registration never ran: submission ended before it was due")??;

    let on_new: Vec<DateTime<Utc>> = paced
        .observed
        .iter()
        .filter(|observed| {
            observed.record.component_digest.as_deref() == Some(registration.digest.as_str())
        })
        .filter_map(|observed| observed.record.start_time)
        .collect();
    let first_on_new = on_new.iter().min().copied();
    let old_after_return = paced
        .observed
        .iter()
        .filter(|observed| {
            observed.record.component_digest.as_deref() != Some(registration.digest.as_str())
                && observed
                    .record
                    .start_time
                    .is_some_and(|start| start > registration.returned_at)
        })
        .count();
    Ok(json!({
        "register_seconds": registration.command_seconds,
        "tasks_on_new_version": on_new.len(),
        "old_version_starts_after_return": old_after_return,
        "first_start_after_return_ms": first_on_new
            .map(|first| (first - registration.returned_at).num_microseconds().unwrap_or(0) as f64 / 1e3),
        "unfinished": paced.unfinished,
    }))
}

/// Runs `bgw register multiply FILE --json` and returns when it returned and the digest.
fn register(
    bgw: &std::path::Path,
    data_dir: &std::path::Path,
    wasm: &std::path::Path,
) -> anyhow::Result<Registration> {
    let started = std::time::Instant::now();
    let output = Command::new(bgw)
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--json")
        .args(["register", "multiply"])
        .arg(wasm)
        .output()
        .with_context(|| format!("failed to run {}", bgw.display()))?;
    let returned_at = Utc::now();
    if !output.status.success() {
        anyhow::bail!(
            "bgw register failed with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let version: Value = serde_json::from_slice(&output.stdout)
        .context("bgw register --json printed something that is not JSON")?;
    let digest = version["digest"]
        .as_str()
        .context("bgw register --json printed no digest")?
        .to_owned();
    Ok(Registration {
        returned_at,
        command_seconds: started.elapsed().as_secs_f64(),
        digest,
    })
}

/// Writes `base` with a component-level custom section appended: the same code under a
/// new digest, so the registry takes it as a new version.
fn write_new_version(base: &std::path::Path, target: &std::path::Path) -> anyhow::Result<()> {
    let mut wasm =
        std::fs::read(base).with_context(|| format!("failed to read {}", base.display()))?;
    let name = b"bgw-bench-swap";
    let stamp = Utc::now().timestamp_micros().to_le_bytes();
    let mut section = vec![name.len() as u8];
    section.extend_from_slice(name);
    section.extend_from_slice(&stamp);
    wasm.push(0); // custom section id
    push_leb128(&mut wasm, section.len() as u64);
    wasm.extend_from_slice(&section);
    std::fs::write(target, wasm).with_context(|| format!("failed to write {}", target.display()))
}

fn push_leb128(bytes: &mut Vec<u8>, mut value: u64) {
    loop {
        let low = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            bytes.push(low);
            return;
        }
        bytes.push(low | 0x80);
    }
}

//! Bulk submission through the library, one `start_activity` call per task.

use std::time::Instant;

use anyhow::Context as _;
use serde_json::{json, Value};

use crate::StoreArgs;

#[derive(clap::Args, Debug)]
pub struct SubmitArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Number of tasks to submit
    #[arg(long, value_name = "N")]
    count: u64,
    /// Activity type of the tasks
    #[arg(long, default_value = "multiply")]
    activity_type: String,
    /// Payload of every task, a JSON object
    #[arg(long, default_value = r#"{"x":21}"#)]
    payload: String,
}

/// Submits `count` tasks one after the other and reports the rate.
pub async fn run(args: SubmitArgs) -> anyhow::Result<Value> {
    let client = crate::open_client(&args.store.data_dir)?;
    let started = Instant::now();
    let started_at = chrono::Utc::now();
    for _ in 0..args.count {
        client
            .start_activity(
                &args.activity_type,
                &args.store.resource,
                args.payload.as_bytes(),
                None,
            )
            .await
            .with_context(|| format!("failed to submit a task of type {:?}", args.activity_type))?;
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(json!({
        "tasks": args.count,
        "seconds": seconds,
        "rate": args.count as f64 / seconds,
        "started_at": bgw::record::format_time(&started_at),
    }))
}

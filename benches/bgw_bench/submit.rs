//! Submission through the library: in bulk with `start_activities`, or one
//! `start_activity` call per task.

use std::time::Instant;

use anyhow::Context as _;
use bgw::client::{StartRequest, WorkflowClient};
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
    /// Tasks per `start_activities` call
    #[arg(long, value_name = "N", default_value_t = 1_000)]
    batch: u64,
    /// Submit with one `start_activity` call per task instead of in bulk
    #[arg(long)]
    one_at_a_time: bool,
}

/// Submits `count` tasks and reports the rate and the API it used.
pub async fn run(args: SubmitArgs) -> anyhow::Result<Value> {
    anyhow::ensure!(args.batch > 0, "invalid --batch 0: it must be at least 1");
    let client = crate::open_client(&args.store.data_dir)?;
    let started = Instant::now();
    let started_at = chrono::Utc::now();
    let api = match args.one_at_a_time {
        true => {
            submit_one_at_a_time(&client, &args).await?;
            "start_activity"
        }
        false => {
            submit_in_bulk(&client, &args).await?;
            "start_activities"
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    Ok(json!({
        "tasks": args.count,
        "seconds": seconds,
        "rate": args.count as f64 / seconds,
        "started_at": bgw::record::format_time(&started_at),
        "api": api,
        "batch": if args.one_at_a_time { 1 } else { args.batch },
    }))
}

async fn submit_one_at_a_time(client: &WorkflowClient, args: &SubmitArgs) -> anyhow::Result<()> {
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
    Ok(())
}

async fn submit_in_bulk(client: &WorkflowClient, args: &SubmitArgs) -> anyhow::Result<()> {
    let mut remaining = args.count;
    while remaining > 0 {
        let batch = remaining.min(args.batch);
        let requests = (0..batch)
            .map(|_| {
                StartRequest::new(
                    &args.activity_type,
                    &args.store.resource,
                    args.payload.as_bytes(),
                )
            })
            .collect();
        client.start_activities(requests).await.with_context(|| {
            format!(
                "failed to submit {batch} tasks of type {:?}",
                args.activity_type
            )
        })?;
        remaining -= batch;
    }
    Ok(())
}

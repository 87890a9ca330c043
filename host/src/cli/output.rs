//! Human-readable and JSON output of records, versions and progress.

use anyhow::Result;
use bgw::backend::ComponentVersion;
use bgw::record::{format_time, Status, TaskRecord};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Prints a value as pretty JSON on stdout.
pub fn print_json<T: serde::Serialize + ?Sized>(value: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Prints one record as `Field: value` lines.
pub fn print_record(record: &TaskRecord) {
    let time = |value: &Option<chrono::DateTime<chrono::Utc>>| {
        value.as_ref().map(format_time).unwrap_or_default()
    };
    let fields = [
        ("RowKey", record.row_key.clone()),
        ("PartitionKey", record.partition_key.clone()),
        ("TaskType", record.task_type.clone()),
        ("Status", record.status.to_string()),
        ("Attempt", record.attempt.to_string()),
        (
            "ComponentDigest",
            record.component_digest.clone().unwrap_or_default(),
        ),
        ("StartTime", time(&record.start_time)),
        ("EndTime", time(&record.end_time)),
        (
            "FuelUsed",
            record.fuel_used.map(|f| f.to_string()).unwrap_or_default(),
        ),
        ("OutputPayload", record.output_payload.clone()),
        (
            "ErrorMessage",
            record.error_message.clone().unwrap_or_default(),
        ),
        (
            "OutputBlob",
            match (&record.output_container_name, &record.output_blob_name) {
                (Some(container), Some(name)) => format!("{container}/{name}"),
                _ => String::new(),
            },
        ),
    ];
    for (name, value) in fields {
        if !value.is_empty() {
            println!("{name}: {value}");
        }
    }
}

/// Prints records as a table, one line each.
pub fn print_table(records: &[TaskRecord]) {
    println!(
        "{:<36}  {:<10}  {:<20}  {:<7}  {:<12}  RESOURCE",
        "TASK ID", "STATUS", "TYPE", "ATTEMPT", "DIGEST"
    );
    for record in records {
        let digest = record.component_digest.as_deref().unwrap_or("-");
        println!(
            "{:<36}  {:<10}  {:<20}  {:<7}  {:<12}  {}",
            record.row_key,
            record.status,
            record.task_type,
            record.attempt,
            &digest[..digest.len().min(12)],
            record.partition_key
        );
    }
}

/// Prints how many of the records ended in each status.
pub fn print_summary(records: &[TaskRecord]) {
    for status in Status::ALL {
        let count = records
            .iter()
            .filter(|record| record.status == status)
            .count();
        if count > 0 {
            println!("{status}: {count}");
        }
    }
}

/// Prints component versions as a table.
pub fn print_versions(versions: &[ComponentVersion]) {
    println!(
        "{:<20}  {:>7}  {:<12}  {:>14}  {:>10}  {:>8}  {:>12}  {:>8}  REGISTERED",
        "TYPE", "VERSION", "DIGEST", "FUEL", "MEMORY", "TIMEOUT", "MAX OUTPUT", "ATTEMPTS"
    );
    for version in versions {
        println!(
            "{:<20}  {:>7}  {:<12}  {:>14}  {:>6} MiB  {:>6} s  {:>12}  {:>8}  {}{}",
            version.activity_type,
            version.version,
            &version.digest[..12],
            version.limits.fuel,
            version.limits.memory_mib,
            version.limits.timeout_secs,
            version.limits.max_output_bytes,
            version.limits.retry.max_attempts,
            format_time(&version.registered_at),
            if version.current { "  (current)" } else { "" }
        );
    }
}

/// Creates a progress bar on stderr, drawn only when `show` and stderr is a terminal.
pub fn progress_bar(show: bool, total: u64, message: &'static str) -> ProgressBar {
    if !show || !super::commands::stderr_is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{msg} {bar:40} {pos}/{len} {per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(message);
    bar
}

//! Human-readable and JSON output of records, versions and progress.
//!
//! Everything goes to stdout through [`outln!`], which returns write errors where
//! `println!` panics. Once the reader of a pipe has closed it, as in `bgw list | head -5`,
//! the rest of the output is discarded, and the command ends with its usual exit code and
//! no message.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use bgw::backend::ComponentVersion;
use bgw::record::{format_time, Status, TaskRecord};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Writes a line to stdout like `println!`, and evaluates to `anyhow::Result<()>`.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cli::output::write_line(format_args!($($arg)*))
    };
}
pub(crate) use outln;

/// Set once a write to stdout failed because the reader closed the pipe.
static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);

/// Writes one line to stdout. A closed pipe discards this line and every later one.
pub fn write_line(line: std::fmt::Arguments<'_>) -> Result<()> {
    if STDOUT_CLOSED.load(Ordering::Relaxed) {
        return Ok(());
    }
    let mut stdout = std::io::stdout().lock();
    let written = stdout
        .write_fmt(line)
        .and_then(|()| stdout.write_all(b"\n"));
    match written {
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => {
            STDOUT_CLOSED.store(true, Ordering::Relaxed);
            Ok(())
        }
        other => other.context("failed to write to stdout"),
    }
}

/// Prints a value as pretty JSON on stdout.
pub fn print_json<T: serde::Serialize + ?Sized>(value: &T) -> Result<()> {
    outln!("{}", serde_json::to_string_pretty(value)?)
}

/// Prints one record as `Field: value` lines.
pub fn print_record(record: &TaskRecord) -> Result<()> {
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
            outln!("{name}: {value}")?;
        }
    }
    Ok(())
}

/// Prints records as a table, one line each.
pub fn print_table(records: &[TaskRecord]) -> Result<()> {
    outln!(
        "{:<36}  {:<10}  {:<20}  {:<7}  {:<12}  RESOURCE",
        "TASK ID",
        "STATUS",
        "TYPE",
        "ATTEMPT",
        "DIGEST"
    )?;
    for record in records {
        let digest = record.component_digest.as_deref().unwrap_or("-");
        outln!(
            "{:<36}  {:<10}  {:<20}  {:<7}  {:<12}  {}",
            record.row_key,
            record.status,
            record.task_type,
            record.attempt,
            &digest[..digest.len().min(12)],
            record.partition_key
        )?;
    }
    Ok(())
}

/// Prints how many of the records ended in each status.
pub fn print_summary(records: &[TaskRecord]) -> Result<()> {
    for status in Status::ALL {
        let count = records
            .iter()
            .filter(|record| record.status == status)
            .count();
        if count > 0 {
            outln!("{status}: {count}")?;
        }
    }
    Ok(())
}

/// Prints component versions as a table.
pub fn print_versions(versions: &[ComponentVersion]) -> Result<()> {
    outln!(
        "{:<20}  {:>7}  {:<12}  {:>14}  {:>10}  {:>8}  {:>12}  {:>8}  REGISTERED",
        "TYPE",
        "VERSION",
        "DIGEST",
        "FUEL",
        "MEMORY",
        "TIMEOUT",
        "MAX OUTPUT",
        "ATTEMPTS"
    )?;
    for version in versions {
        outln!(
            "{:<20}  {:>7}  {:<12}  {:>14}  {:>6} MiB  {:>6} s  {:>12}  {:>8}  {}{}",
            version.activity_type,
            version.version,
            &version.digest[..12],
            version.limits.fuel,
            version.limits.memory_mib,
            version.limits.timeout_secs,
            format_bytes(version.limits.max_output_bytes),
            version.limits.retry.max_attempts,
            format_time(&version.registered_at),
            if version.current { "  (current)" } else { "" }
        )?;
    }
    Ok(())
}

/// Formats a size in MiB or KiB when it is a whole number of them, and in bytes otherwise.
fn format_bytes(bytes: u64) -> String {
    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * KIB;
    match bytes {
        0 => "0 B".to_owned(),
        _ if bytes.is_multiple_of(MIB) => format!("{} MiB", bytes / MIB),
        _ if bytes.is_multiple_of(KIB) => format!("{} KiB", bytes / KIB),
        _ => format!("{bytes} B"),
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

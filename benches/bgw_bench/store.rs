//! Reads the daemon's SQLite file directly: the count and the timestamps of finished
//! tasks. Direct reads keep the polling cheap. The column and table names are those of
//! `host/src/backend/sqlite/schema.rs`.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use rusqlite::{Connection, OpenFlags};
use serde_json::{json, Value};

use crate::StoreArgs;

#[derive(clap::Args, Debug)]
pub struct DrainArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Number of finished tasks of the resource id to wait for
    #[arg(long, value_name = "N")]
    expect: u64,
    /// Seconds to wait before giving up and reporting what finished
    #[arg(long, value_name = "SECS", default_value_t = 120.0)]
    timeout: f64,
    /// Start of the measured span (RFC 3339); default: the first task's start time
    #[arg(long, value_name = "TIME")]
    since: Option<String>,
}

/// Interval between two counts of finished tasks.
const POLL: Duration = Duration::from_millis(20);

/// Waits until `expect` tasks of the resource id are finished, then reports the span from
/// the first start (or `since`) to the last end, from the stored timestamps.
pub fn drain(args: DrainArgs) -> anyhow::Result<Value> {
    let settings = crate::settings(&args.store.data_dir)?;
    let connection = Connection::open_with_flags(
        settings.db_path(),
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("failed to open {}", settings.db_path().display()))?;
    connection.busy_timeout(Duration::from_secs(5))?;
    let finished_table = &settings.finished_table_name;

    let count_sql = format!("SELECT count(*) FROM {finished_table} WHERE resource_id = ?1");
    let started = Instant::now();
    let (finished, timed_out) = loop {
        let finished: u64 =
            connection.query_row(&count_sql, [&args.store.resource], |row| row.get(0))?;
        if finished >= args.expect {
            break (finished, false);
        }
        if started.elapsed().as_secs_f64() > args.timeout {
            break (finished, true);
        }
        std::thread::sleep(POLL);
    };

    let span_sql = format!(
        "SELECT min(start_time), max(end_time), sum(status = 'COMPLETED') FROM {finished_table}
         WHERE resource_id = ?1"
    );
    let (first_start, last_end, completed): (Option<String>, Option<String>, Option<u64>) =
        connection.query_row(&span_sql, [&args.store.resource], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        })?;
    let span_start = args.since.clone().or(first_start);
    let seconds = match (&span_start, &last_end) {
        (Some(start), Some(end)) => seconds_between(start, end)?,
        _ => 0.0,
    };
    let completed = completed.unwrap_or(0);
    Ok(json!({
        "finished": finished,
        "completed": completed,
        "timed_out": timed_out,
        "seconds": seconds,
        "rate": if seconds > 0.0 { completed as f64 / seconds } else { 0.0 },
        "first_start": span_start,
        "last_end": last_end,
    }))
}

/// Seconds from one stored RFC 3339 time to another.
pub fn seconds_between(start: &str, end: &str) -> anyhow::Result<f64> {
    let start = bgw::record::parse_time(start).map_err(anyhow::Error::msg)?;
    let end = bgw::record::parse_time(end).map_err(anyhow::Error::msg)?;
    Ok((end - start).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6)
}

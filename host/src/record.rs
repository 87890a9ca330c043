//! Task records, statuses and queue messages in the wire format of `background-workflows` 0.3.0.
//!
//! Field names follow the Python library exactly so that its clients and `bgw` can share one
//! deployment: the record keys are PascalCase (`PartitionKey`, `RowKey`, ...) and the queue
//! message keys are snake_case (`resource_id`, `row_key`, ...). Fields that only `bgw` writes
//! use the same PascalCase style and are ignored by the Python library.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, NaiveDateTime, SecondsFormat, SubsecRound, Timelike, Utc};
use serde::{Deserialize, Serialize};

/// Default name of the table of tasks that have not finished, as in `background-workflows`.
pub const DEFAULT_ACTIVE_TABLE: &str = "ActiveTasks";
/// Default name of the table of finished tasks, as in `background-workflows`.
pub const DEFAULT_FINISHED_TABLE: &str = "FinishedTasks";
/// Default SQLite database path of `background-workflows`, sent in every queue message.
pub const DEFAULT_DATABASE_NAME: &str = "local_tasks.db";

/// Lifecycle status of a task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    Created,
    Running,
    Completed,
    Error,
    Cancelled,
}

impl Status {
    /// Every status, in lifecycle order.
    pub const ALL: [Status; 5] = [
        Status::Created,
        Status::Running,
        Status::Completed,
        Status::Error,
        Status::Cancelled,
    ];

    /// Returns the status as stored: `CREATED`, `RUNNING`, `COMPLETED`, `ERROR` or `CANCELLED`.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Created => "CREATED",
            Status::Running => "RUNNING",
            Status::Completed => "COMPLETED",
            Status::Error => "ERROR",
            Status::Cancelled => "CANCELLED",
        }
    }

    /// Returns true for the statuses after which a task never runs again.
    pub fn is_terminal(self) -> bool {
        matches!(self, Status::Completed | Status::Error | Status::Cancelled)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl FromStr for Status {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Status::ALL
            .into_iter()
            .find(|status| status.as_str().eq_ignore_ascii_case(text))
            .ok_or_else(|| {
                format!(
                    "invalid status {text:?}: expected one of CREATED, RUNNING, COMPLETED, ERROR, CANCELLED"
                )
            })
    }
}

/// One task as stored in the active or finished table.
///
/// The first twelve fields are those of `background-workflows`; the rest are `bgw`'s own.
/// Serialized with the stored field names, so `--json` output matches the table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct TaskRecord {
    /// Resource id the task belongs to.
    pub partition_key: String,
    /// Task id, a UUID.
    pub row_key: String,
    /// Activity type.
    pub task_type: String,
    pub status: Status,
    /// The payload as a JSON string.
    pub input_payload: String,
    /// The result as a JSON string, empty until the task completes.
    pub output_payload: String,
    #[serde(with = "optional_time")]
    pub start_time: Option<DateTime<Utc>>,
    #[serde(with = "optional_time")]
    pub end_time: Option<DateTime<Utc>>,
    #[serde(rename = "BatchID")]
    pub batch_id: String,
    pub error_message: Option<String>,
    /// Container of the input blob, when the task has one.
    pub container_name: Option<String>,
    /// Name of the input blob inside `container_name`.
    pub blob_name: Option<String>,
    /// Number of the attempt that ran or runs the task, 0 before the first one.
    pub attempt: u32,
    /// SHA-256 digest of the component that ran the last attempt.
    pub component_digest: Option<String>,
    /// Registry version of that component.
    pub component_version: Option<u32>,
    /// Fuel the last attempt consumed.
    pub fuel_used: Option<u64>,
    /// Last progress the guest reported, in percent.
    pub progress: Option<u8>,
    pub progress_message: Option<String>,
    /// Container of the output blob, when the guest wrote one.
    pub output_container_name: Option<String>,
    /// Name of the output blob inside `output_container_name`.
    pub output_blob_name: Option<String>,
    /// Guest log lines, stdout and stderr of the last attempt, bounded.
    pub task_log: Option<String>,
    /// Host that ran the last attempt.
    pub host_id: Option<String>,
    /// Time the record was created.
    #[serde(with = "optional_time")]
    pub created_time: Option<DateTime<Utc>>,
    /// One entry per finished attempt, oldest first.
    pub attempt_history: Vec<AttemptSummary>,
    /// Time after which the task must not start or go on running.
    #[serde(with = "optional_time")]
    pub deadline_time: Option<DateTime<Utc>>,
    /// Key a client sent so that retrying its submit creates the task only once.
    pub idempotency_key: Option<String>,
    /// Set by `bgw cancel` while the task runs: the daemon stops it.
    pub cancel_requested: bool,
    /// Lease time, on the queue's clock, of the first look that found no component for the
    /// task's activity type. The missing-component grace counts from it, and it is cleared
    /// when an attempt begins or the wait ends.
    #[serde(with = "optional_time")]
    pub component_wait_start: Option<DateTime<Utc>>,
}

/// Summary of one finished attempt of a task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct AttemptSummary {
    pub attempt: u32,
    pub component_digest: Option<String>,
    #[serde(with = "optional_time")]
    pub start_time: Option<DateTime<Utc>>,
    #[serde(with = "optional_time")]
    pub end_time: Option<DateTime<Utc>>,
    pub fuel_used: Option<u64>,
    pub host_id: Option<String>,
    /// Error of the attempt; `None` for the attempt that completed.
    pub error_message: Option<String>,
    /// True for an attempt that a daemon shutdown interrupted: it did not fail, and it does
    /// not count toward the attempts of the retry policy. Left out of the JSON when false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub interrupted: bool,
}

impl TaskRecord {
    /// Returns the summary of the attempt this record describes now.
    pub fn current_attempt(&self) -> AttemptSummary {
        AttemptSummary {
            attempt: self.attempt,
            component_digest: self.component_digest.clone(),
            start_time: self.start_time,
            end_time: self.end_time,
            fuel_used: self.fuel_used,
            host_id: self.host_id.clone(),
            error_message: self.error_message.clone(),
            interrupted: false,
        }
    }

    /// Sets `EndTime` to now, or to `StartTime` if that is later. The start may have been
    /// stamped by another host whose clock is ahead of this one's, and no record may end
    /// before it starts.
    pub fn set_end_time_now(&mut self) {
        let now = now();
        self.end_time = Some(self.start_time.map_or(now, |start| start.max(now)));
    }

    /// Ends a CREATED task CANCELLED: one still queued, or one waiting for a retry. The
    /// error message names how many attempts already ran.
    pub fn cancel_unstarted(&mut self) {
        self.status = Status::Cancelled;
        self.set_end_time_now();
        let ran = self.attempt_history.len();
        self.error_message = Some(match ran {
            0 => "cancelled before it started".to_owned(),
            _ => format!(
                "cancelled while it waited for a retry, after {ran} attempt{}",
                if ran == 1 { "" } else { "s" }
            ),
        });
    }

    /// Checks that `request`, a new task with this record's idempotency key, has the same
    /// activity type, resource id and payload, where payloads compare as JSON values.
    /// Returns [`Error::IdempotencyConflict`](crate::Error) otherwise.
    pub fn check_same_request(&self, request: &TaskRecord) -> crate::Result<()> {
        let difference = if self.task_type != request.task_type {
            format!(
                "activity type ({:?}, not {:?})",
                self.task_type, request.task_type
            )
        } else if self.partition_key != request.partition_key {
            format!(
                "resource id ({:?}, not {:?})",
                self.partition_key, request.partition_key
            )
        } else if !same_json(&self.input_payload, &request.input_payload) {
            "payload".to_owned()
        } else {
            return Ok(());
        };
        Err(crate::Error::IdempotencyConflict {
            key: request.idempotency_key.clone().unwrap_or_default(),
            task_id: self.row_key.clone(),
            resource_id: self.partition_key.clone(),
            difference,
        })
    }

    /// Creates a CREATED record for a new task.
    pub fn new(task_id: &str, resource_id: &str, activity_type: &str, payload_json: &str) -> Self {
        TaskRecord {
            partition_key: resource_id.to_owned(),
            row_key: task_id.to_owned(),
            task_type: activity_type.to_owned(),
            status: Status::Created,
            input_payload: payload_json.to_owned(),
            output_payload: String::new(),
            start_time: None,
            end_time: None,
            batch_id: String::new(),
            error_message: None,
            container_name: None,
            blob_name: None,
            attempt: 0,
            component_digest: None,
            component_version: None,
            fuel_used: None,
            progress: None,
            progress_message: None,
            output_container_name: None,
            output_blob_name: None,
            task_log: None,
            host_id: None,
            created_time: Some(now()),
            attempt_history: Vec::new(),
            deadline_time: None,
            idempotency_key: None,
            cancel_requested: false,
            component_wait_start: None,
        }
    }
}

/// Returns true when two texts are the same JSON value, or the same text if either is not
/// JSON, so that `{"x":1}` and `{"x": 1}` are one payload.
fn same_json(left: &str, right: &str) -> bool {
    let parse = |text: &str| serde_json::from_str::<serde_json::Value>(text).ok();
    match (parse(left), parse(right)) {
        (Some(left), Some(right)) => left == right,
        _ => left == right,
    }
}

/// Queue message body, with the eight keys `background-workflows` always writes.
///
/// Unknown keys are ignored on read, so messages from newer producers keep working.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QueueMessage {
    pub resource_id: String,
    pub row_key: String,
    pub task_type: String,
    pub payload: serde_json::Value,
    pub store_mode: String,
    pub active_table_name: String,
    pub finished_table_name: String,
    pub database_name: String,
}

impl QueueMessage {
    /// Parses a message body, naming the first problem found.
    pub fn parse(body: &str) -> Result<Self, String> {
        serde_json::from_str(body).map_err(|error| match error.classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof => format!(
                "invalid queue message: the body is not valid JSON ({error}); messages are plain UTF-8 JSON text, not base64"
            ),
            _ => format!("invalid queue message: {error}"),
        })
    }

    /// Decodes a body that is the base64 of a message, as producers that encode queue
    /// messages write it. Returns `None` for anything else. The daemon does not run such
    /// a message; it only uses it to find the task it names.
    pub fn parse_base64(body: &str) -> Option<Self> {
        use base64::Engine;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(body.trim())
            .ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Reads the task id (`row_key`) and the resource id that a message body names, for a
    /// dead letter. The body may be JSON text, or the base64 of it as some producers write
    /// it. Each is `None` when the body does not name it.
    pub fn task_key_of(body: &str) -> (Option<String>, Option<String>) {
        use base64::Engine;
        let value = serde_json::from_str::<serde_json::Value>(body)
            .ok()
            .or_else(|| {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(body.trim())
                    .ok()?;
                serde_json::from_slice(&bytes).ok()
            });
        let Some(value) = value else {
            return (None, None);
        };
        let field = |name: &str| {
            value
                .get(name)
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned)
        };
        (field("row_key"), field("resource_id"))
    }

    /// Serializes the message as Python's `json.dumps` does with its defaults: `", "` and `": "`
    /// separators and every non-ASCII character escaped as `\uXXXX`.
    pub fn to_python_json(&self) -> String {
        to_python_json(self)
    }
}

/// Serializes a value as Python's `json.dumps` does with its default arguments.
pub fn to_python_json<T: Serialize>(value: &T) -> String {
    let mut out = Vec::new();
    let mut serializer = serde_json::Serializer::with_formatter(&mut out, PythonFormatter);
    value
        .serialize(&mut serializer)
        .expect("serializing to memory cannot fail");
    String::from_utf8(out).expect("the formatter writes only ASCII")
}

/// A `serde_json` formatter that writes the layout of Python's `json.dumps`.
struct PythonFormatter;

impl serde_json::ser::Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        write_separator(writer, first)
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        write_separator(writer, first)
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
    ) -> std::io::Result<()> {
        writer.write_all(b": ")
    }

    fn write_string_fragment<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> std::io::Result<()> {
        for ch in fragment.chars() {
            if ch.is_ascii() {
                writer.write_all(&[ch as u8])?;
            } else {
                let mut units = [0u16; 2];
                for unit in ch.encode_utf16(&mut units) {
                    write!(writer, "\\u{unit:04x}")?;
                }
            }
        }
        Ok(())
    }
}

/// Writes Python's item separator `", "` before every item but the first.
fn write_separator<W: ?Sized + std::io::Write>(writer: &mut W, first: bool) -> std::io::Result<()> {
    if first {
        Ok(())
    } else {
        writer.write_all(b", ")
    }
}

/// Formats a time as the records store it: RFC 3339 in UTC with a `Z` suffix and six
/// fractional digits, or seven when the 100 ns digit is not zero. Digits below 100 ns are
/// dropped.
///
/// `background-workflows` 0.3.0 writes and reads six digits, because Python's `datetime`
/// has microseconds, and every time `bgw` creates is in whole microseconds (see [`now`]).
/// Seven digits keep the 100 ns precision of Azure's `Edm.DateTime` for times that other
/// writers stored.
pub fn format_time(time: &DateTime<Utc>) -> String {
    let micros = time.to_rfc3339_opts(SecondsFormat::Micros, true);
    let hundreds_of_nanos = time.nanosecond() % 1_000 / 100;
    if hundreds_of_nanos == 0 {
        return micros;
    }
    let without_zone = micros.strip_suffix('Z').unwrap_or(&micros);
    format!("{without_zone}{hundreds_of_nanos}Z")
}

/// Returns the current time in whole microseconds, the time `bgw` stores in the records it
/// writes, so that [`format_time`] writes it with the six digits Python reads.
pub fn now() -> DateTime<Utc> {
    truncate_to_micros(Utc::now())
}

/// Drops the digits of a time below one microsecond.
pub fn truncate_to_micros(time: DateTime<Utc>) -> DateTime<Utc> {
    time.trunc_subsecs(6)
}

/// Parses a stored time.
///
/// Accepts RFC 3339 with any fraction up to nanoseconds and any offset, and the naive ISO
/// form without an offset that the Python library writes to SQLite, which is read as UTC.
pub fn parse_time(text: &str) -> Result<DateTime<Utc>, String> {
    let text = text.trim();
    if let Ok(time) = DateTime::parse_from_rfc3339(text) {
        return Ok(time.with_timezone(&Utc));
    }
    for format in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"] {
        if let Ok(naive) = NaiveDateTime::parse_from_str(text, format) {
            return Ok(naive.and_utc());
        }
    }
    Err(format!(
        "invalid time {text:?}: expected RFC 3339 such as 2026-12-04T15:17:23.154769Z"
    ))
}

/// Serde format of optional record times: [`format_time`] out, [`parse_time`] in.
pub mod optional_time {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes a time as [`super::format_time`] does, or null.
    pub fn serialize<S: Serializer>(
        time: &Option<DateTime<Utc>>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match time {
            Some(time) => serializer.serialize_str(&super::format_time(time)),
            None => serializer.serialize_none(),
        }
    }

    /// Reads a time in any form [`super::parse_time`] accepts, or null.
    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<DateTime<Utc>>, D::Error> {
        let text: Option<String> = Option::deserialize(deserializer)?;
        text.map(|text| super::parse_time(&text).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// Serde format of required times, for types other than the task record.
pub mod required_time {
    use chrono::{DateTime, Utc};
    use serde::Serializer;

    /// Writes a time as [`super::format_time`] does.
    pub fn serialize<S: Serializer>(
        time: &DateTime<Utc>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&super::format_time(time))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancel_message_names_attempts_run() {
        let mut queued = TaskRecord::new("t", "r", "a", "{}");
        queued.cancel_unstarted();
        assert_eq!(queued.status, Status::Cancelled);
        assert!(queued.end_time.is_some());
        assert_eq!(
            queued.error_message.as_deref(),
            Some("cancelled before it started")
        );

        let mut retrying = TaskRecord::new("t", "r", "a", "{}");
        for attempt in 1..=2 {
            retrying.attempt = attempt;
            retrying.attempt_history.push(retrying.current_attempt());
        }
        retrying.cancel_unstarted();
        assert_eq!(
            retrying.error_message.as_deref(),
            Some("cancelled while it waited for a retry, after 2 attempts")
        );
    }

    #[test]
    fn task_key_of_reads_json_and_base64_bodies() {
        let body = r#"{"row_key": "t-1", "resource_id": "r-1", "task_type": "multiply"}"#;
        let expected = (Some("t-1".to_owned()), Some("r-1".to_owned()));
        assert_eq!(QueueMessage::task_key_of(body), expected);

        use base64::Engine;
        let encoded = base64::engine::general_purpose::STANDARD.encode(body);
        assert_eq!(QueueMessage::task_key_of(&encoded), expected);

        assert_eq!(QueueMessage::task_key_of("not json"), (None, None));
        assert_eq!(
            QueueMessage::task_key_of(r#"{"resource_id": "r-1"}"#),
            (None, Some("r-1".to_owned()))
        );
    }

    #[test]
    fn python_json_layout_matches_json_dumps() {
        let message = QueueMessage {
            resource_id: "res-1".into(),
            row_key: "k".into(),
            task_type: "demo".into(),
            payload: serde_json::json!({"x": 1, "note": "caf\u{e9} \u{2713} \u{1f600}", "l": [1, 2]}),
            store_mode: "sqlite".into(),
            active_table_name: DEFAULT_ACTIVE_TABLE.into(),
            finished_table_name: DEFAULT_FINISHED_TABLE.into(),
            database_name: DEFAULT_DATABASE_NAME.into(),
        };
        let text = message.to_python_json();
        assert!(text.starts_with(
            r#"{"resource_id": "res-1", "row_key": "k", "task_type": "demo", "payload": {"#
        ));
        assert!(
            text.contains(r#""note": "caf\u00e9 \u2713 \ud83d\ude00""#),
            "{text}"
        );
        assert!(text.contains(r#""l": [1, 2]"#), "{text}");
        assert_eq!(QueueMessage::parse(&text).unwrap(), message);
    }

    #[test]
    fn queue_message_ignores_unknown_keys() {
        let body = r#"{"resource_id": "r", "row_key": "k", "task_type": "t", "payload": {}, "store_mode": "sqlite", "active_table_name": "A", "finished_table_name": "F", "database_name": "d", "added_later": 1}"#;
        let message = QueueMessage::parse(body).unwrap();
        assert_eq!(message.task_type, "t");
    }

    #[test]
    fn queue_message_missing_key_is_named() {
        let error =
            QueueMessage::parse(r#"{"task_type": "multiply", "resource_id": "r"}"#).unwrap_err();
        assert!(error.contains("row_key"), "{error}");
    }

    #[test]
    fn queue_message_not_json_is_named() {
        let error = QueueMessage::parse("eyJyZXNvdXJjZV9pZCI6").unwrap_err();
        assert!(error.contains("not valid JSON"), "{error}");
    }

    #[test]
    fn naive_time_is_read_as_utc() {
        let time = parse_time("2014-09-02T21:09:14.884854").unwrap();
        assert_eq!(format_time(&time), "2014-09-02T21:09:14.884854Z");
    }

    #[test]
    fn seven_digit_fraction_keeps_100ns() {
        let time = parse_time("2014-09-02T21:09:14.8848547Z").unwrap();
        assert_eq!(time.timestamp_subsec_nanos(), 884_854_700);
    }

    #[test]
    fn format_time_round_trips_100ns() {
        let cases = [
            "2014-09-02T21:09:14.8848547Z",
            "9999-12-31T23:59:59.9999999Z",
            "2024-02-29T23:59:59.0000001Z",
            "2014-09-02T21:09:14.884854Z",
            "2014-09-02T21:09:14.000000Z",
        ];
        for text in cases {
            let time = parse_time(text).unwrap();
            assert_eq!(format_time(&time), text);
        }
    }

    #[test]
    fn format_time_drops_digits_below_100ns() {
        let time = parse_time("2014-09-02T21:09:14.884854789Z").unwrap();
        assert_eq!(format_time(&time), "2014-09-02T21:09:14.8848547Z");
        let time = parse_time("2014-09-02T21:09:14.884854099Z").unwrap();
        assert_eq!(format_time(&time), "2014-09-02T21:09:14.884854Z");
    }

    #[test]
    fn times_bgw_creates_have_six_digits() {
        let texts = [
            format_time(&now()),
            format_time(
                &TaskRecord::new("k", "r", "demo", "{}")
                    .created_time
                    .unwrap(),
            ),
        ];
        for text in texts {
            let fraction = text.split_once('.').unwrap().1;
            assert_eq!(fraction.len(), "123456Z".len(), "{text}");
        }
    }

    #[test]
    fn end_time_never_before_start_time() {
        let mut record = TaskRecord::new("k", "r", "demo", "{}");
        let ahead = Utc::now() + chrono::TimeDelta::minutes(10);
        record.start_time = Some(ahead);
        record.set_end_time_now();
        assert_eq!(record.end_time, Some(ahead));

        let behind = Utc::now() - chrono::TimeDelta::minutes(10);
        record.start_time = Some(behind);
        record.set_end_time_now();
        assert!(record.end_time > Some(behind + chrono::TimeDelta::minutes(9)));
    }

    #[test]
    fn status_parses_case_insensitively() {
        assert_eq!("completed".parse::<Status>().unwrap(), Status::Completed);
        assert!("DONE".parse::<Status>().unwrap_err().contains("DONE"));
    }
}

//! The [`Context`] an activity receives: task identity, blobs, logging, progress and
//! cancellation, each a call into the WIT `host` interface.

use crate::bindings::bgw::activity::host;
use crate::bindings::bgw::activity::types;
use crate::blob::{InputBlob, OutputBlob};

/// Identity of the task an activity runs for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskInfo {
    /// Task id, a UUID.
    pub task_id: String,
    /// Resource id the task belongs to.
    pub resource_id: String,
    /// Activity type the task was started with.
    pub activity_type: String,
    /// Attempt number, starting at 1.
    pub attempt: u32,
}

impl From<types::TaskInfo> for TaskInfo {
    fn from(task: types::TaskInfo) -> Self {
        Self {
            task_id: task.task_id,
            resource_id: task.resource_id,
            activity_type: task.activity_type,
            attempt: task.attempt,
        }
    }
}

/// Severity of a log line, as in the WIT `log-level` enum.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    /// Fine-grained detail.
    Trace,
    /// Detail useful while debugging an activity.
    Debug,
    /// Normal progress.
    Info,
    /// Something unexpected that the activity handled.
    Warn,
    /// A failure.
    Error,
}

impl From<LogLevel> for types::LogLevel {
    fn from(level: LogLevel) -> Self {
        match level {
            LogLevel::Trace => types::LogLevel::Trace,
            LogLevel::Debug => types::LogLevel::Debug,
            LogLevel::Info => types::LogLevel::Info,
            LogLevel::Warn => types::LogLevel::Warn,
            LogLevel::Error => types::LogLevel::Error,
        }
    }
}

/// Handle to the host for one run of an activity.
///
/// Every call reaches only the calling task's own log, blobs and state.
pub struct Context {
    task: TaskInfo,
}

impl Context {
    pub(crate) fn new(task: TaskInfo) -> Self {
        Self { task }
    }

    /// Returns the identity of the task this run belongs to.
    pub fn task(&self) -> &TaskInfo {
        &self.task
    }

    /// Opens the task's input blob, or returns `None` when the task was started without one.
    pub fn input(&self) -> Option<InputBlob> {
        let len = host::input_size()?;
        Some(InputBlob::new(len, Box::new(host::read_input)))
    }

    /// Opens the task's output blob for appending. Several handles append to the same blob.
    pub fn output(&self) -> OutputBlob {
        OutputBlob::new(Box::new(host::write_output))
    }

    /// Appends a line to the task's log.
    pub fn log(&self, level: LogLevel, message: &str) {
        host::log(level.into(), message, &[]);
    }

    /// Appends a line with key-value fields to the task's log.
    pub fn log_with<K: AsRef<str>, V: AsRef<str>>(
        &self,
        level: LogLevel,
        message: &str,
        fields: &[(K, V)],
    ) {
        let fields: Vec<(String, String)> = fields
            .iter()
            .map(|(key, value)| (key.as_ref().to_owned(), value.as_ref().to_owned()))
            .collect();
        host::log(level.into(), message, &fields);
    }

    /// Appends a debug line to the task's log.
    pub fn log_debug(&self, message: &str) {
        self.log(LogLevel::Debug, message);
    }

    /// Appends an info line to the task's log.
    pub fn log_info(&self, message: &str) {
        self.log(LogLevel::Info, message);
    }

    /// Appends a warning line to the task's log.
    pub fn log_warn(&self, message: &str) {
        self.log(LogLevel::Warn, message);
    }

    /// Appends an error line to the task's log.
    pub fn log_error(&self, message: &str) {
        self.log(LogLevel::Error, message);
    }

    /// Reports progress. `percent` above 100 is sent as 100.
    pub fn progress(&self, percent: u8, message: &str) {
        host::progress(percent.min(100), message);
    }

    /// Returns true once the task has been cancelled. A long activity should check this
    /// between steps and return soon after it turns true.
    pub fn is_cancelled(&self) -> bool {
        host::is_cancelled()
    }
}

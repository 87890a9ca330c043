//! The error an activity returns, mapped onto the WIT `task-error` variants.

use std::fmt;

use crate::bindings::bgw::activity::types::TaskError;

/// Result type of an activity function.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Kind of an [`Error`], one per WIT `task-error` variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The payload or input blob is not valid for this activity. The host never retries it.
    InvalidInput,
    /// The activity failed and a retry would fail the same way.
    Failed,
    /// The activity failed for a reason that may pass, such as a busy dependency.
    Retryable,
}

/// Error an activity returns instead of a result.
///
/// Build one with [`Error::invalid_input`], [`Error::failed`] or [`Error::retryable`], or let
/// `?` convert an [`std::io::Error`] or a [`serde_json::Error`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    kind: ErrorKind,
    message: String,
}

impl Error {
    /// Creates an error for a payload or input blob this activity cannot accept.
    pub fn invalid_input(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidInput, message)
    }

    /// Creates an error for a failure that a retry would repeat.
    pub fn failed(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Failed, message)
    }

    /// Creates an error for a failure that may pass on a later attempt.
    pub fn retryable(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Retryable, message)
    }

    /// Creates an error of the given kind.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// Returns the kind, which decides whether the host retries the task.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// Returns the message the host records for the task.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            ErrorKind::InvalidInput => "invalid input",
            ErrorKind::Failed => "failed",
            ErrorKind::Retryable => "retryable",
        };
        write!(f, "{kind}: {}", self.message)
    }
}

impl std::error::Error for Error {}

/// Maps any I/O error, including a rejected `write-output` call, to [`ErrorKind::Failed`].
impl From<std::io::Error> for Error {
    fn from(error: std::io::Error) -> Self {
        Self::failed(error.to_string())
    }
}

/// Maps syntax, data and end-of-file errors to [`ErrorKind::InvalidInput`], because inside an
/// activity they usually come from parsing the input. I/O errors map to [`ErrorKind::Failed`].
/// Wrap a serialization error in [`Error::failed`] yourself if it should not count as bad input.
impl From<serde_json::Error> for Error {
    fn from(error: serde_json::Error) -> Self {
        match error.classify() {
            serde_json::error::Category::Io => Self::failed(error.to_string()),
            _ => Self::invalid_input(error.to_string()),
        }
    }
}

impl From<Error> for TaskError {
    fn from(error: Error) -> Self {
        match error.kind {
            ErrorKind::InvalidInput => TaskError::InvalidInput(error.message),
            ErrorKind::Failed => TaskError::Failed(error.message),
            ErrorKind::Retryable => TaskError::Retryable(error.message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constructors_set_kind_and_message() {
        let cases = [
            (Error::invalid_input("a"), ErrorKind::InvalidInput, "a"),
            (Error::failed("b"), ErrorKind::Failed, "b"),
            (Error::retryable("c"), ErrorKind::Retryable, "c"),
        ];
        for (error, kind, message) in cases {
            assert_eq!(error.kind(), kind);
            assert_eq!(error.message(), message);
        }
    }

    #[test]
    fn error_maps_to_task_error_variant() {
        let invalid = TaskError::from(Error::invalid_input("bad x"));
        assert!(matches!(invalid, TaskError::InvalidInput(m) if m == "bad x"));

        let failed = TaskError::from(Error::failed("broken"));
        assert!(matches!(failed, TaskError::Failed(m) if m == "broken"));

        let retryable = TaskError::from(Error::retryable("busy"));
        assert!(matches!(retryable, TaskError::Retryable(m) if m == "busy"));
    }

    #[test]
    fn io_error_becomes_failed() {
        let error = Error::from(std::io::Error::other("disk on fire"));
        assert_eq!(error.kind(), ErrorKind::Failed);
        assert_eq!(error.message(), "disk on fire");
    }

    #[test]
    fn json_syntax_error_becomes_invalid_input() {
        let parse_error = serde_json::from_str::<serde_json::Value>("{").unwrap_err();
        let error = Error::from(parse_error);
        assert_eq!(error.kind(), ErrorKind::InvalidInput);
        assert!(error.message().contains("EOF"), "{}", error.message());
    }

    #[test]
    fn display_names_kind() {
        assert_eq!(Error::retryable("busy").to_string(), "retryable: busy");
    }
}

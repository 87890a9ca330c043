//! Glue between the WIT `run` export and a typed activity function, used by
//! [`export_activity!`](crate::export_activity).

use std::sync::Once;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::bindings::bgw::activity::{host, types};
use crate::{Context, Error, Result, TaskInfo};

/// Items the expansion of [`export_activity!`](crate::export_activity) names. Not a stable
/// API.
#[doc(hidden)]
pub mod __private {
    pub use crate::bindings::bgw::activity::types::{TaskError, TaskInfo};
    pub use crate::bindings::export;
    pub use crate::bindings::Guest;
    pub use crate::export::run;
}

/// Implements the WIT `run` export with a typed activity function.
///
/// The function takes `&mut Context` and a payload type that implements
/// `serde::Deserialize`, and returns [`Result<R>`](crate::Result) where `R` implements
/// `serde::Serialize`. The macro can be used once per crate. See the [crate] docs for an
/// example.
#[macro_export]
macro_rules! export_activity {
    ($activity:path) => {
        const _: () = {
            struct BgwActivity;

            impl $crate::__private::Guest for BgwActivity {
                fn run(
                    task: $crate::__private::TaskInfo,
                    payload: ::std::string::String,
                ) -> ::core::result::Result<::std::string::String, $crate::__private::TaskError>
                {
                    $crate::__private::run(task, payload, $activity)
                }
            }

    $crate::__private::export!(BgwActivity with_types_in $crate::bindings);
        };
    };
}

/// Runs `activity` for one call of the WIT `run` export.
pub fn run<P, R, F>(
    task: types::TaskInfo,
    payload: String,
    activity: F,
) -> std::result::Result<String, types::TaskError>
where
    P: DeserializeOwned,
    R: Serialize,
    F: FnOnce(&mut Context, P) -> Result<R>,
{
    install_panic_hook();
    let mut context = Context::new(TaskInfo::from(task));
    run_activity(&mut context, &payload, activity).map_err(types::TaskError::from)
}

/// Decodes the payload, calls `activity` and encodes its result as JSON.
///
/// An empty or all-whitespace payload decodes as `{}`, so an activity whose payload fields
/// all have defaults runs without one.
fn run_activity<P, R, F>(context: &mut Context, payload: &str, activity: F) -> Result<String>
where
    P: DeserializeOwned,
    R: Serialize,
    F: FnOnce(&mut Context, P) -> Result<R>,
{
    let payload = if payload.trim().is_empty() {
        "{}"
    } else {
        payload
    };
    let payload: P = serde_json::from_str(payload).map_err(|error| {
        Error::invalid_input(format!(
            "invalid payload for activity `{}`: {error}",
            context.task().activity_type
        ))
    })?;

    let result = activity(context, payload)?;

    serde_json::to_string(&result)
        .map_err(|error| Error::failed(format!("failed to serialize the result as JSON: {error}")))
}

/// Installs, once per instance, a panic hook that sends the panic message to the task log at
/// error level and then runs the previous hook, which prints it to stderr.
fn install_panic_hook() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let message = format!("activity {info}");
            host::log(types::LogLevel::Error, &message, &[]);
            previous(info);
        }));
    });
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    use super::*;
    use crate::ErrorKind;

    #[derive(Deserialize)]
    struct Payload {
        x: i64,
        #[serde(default = "two")]
        factor: i64,
    }

    fn two() -> i64 {
        2
    }

    #[derive(Serialize)]
    struct Product {
        product: i64,
    }

    fn multiply(_context: &mut Context, payload: Payload) -> Result<Product> {
        Ok(Product {
            product: payload.x * payload.factor,
        })
    }

    #[derive(Deserialize, Default)]
    struct Defaults {
        #[serde(default)]
        top: u32,
    }

    fn context() -> Context {
        Context::new(TaskInfo {
            task_id: "0190b7a2-0000-7000-8000-000000000000".into(),
            resource_id: "demo".into(),
            activity_type: "multiply".into(),
            attempt: 1,
        })
    }

    #[test]
    fn payload_decodes_and_result_encodes() {
        let output = run_activity(&mut context(), r#"{"x": 21}"#, multiply).unwrap();
        assert_eq!(output, r#"{"product":42}"#);
    }

    #[test]
    fn bad_payload_is_invalid_input_naming_serde_error() {
        let error = run_activity(&mut context(), r#"{"factor": 3}"#, multiply).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::InvalidInput);
        assert!(
            error
                .message()
                .starts_with("invalid payload for activity `multiply`"),
            "{}",
            error.message()
        );
        assert!(
            error.message().contains("missing field `x`"),
            "{}",
            error.message()
        );
    }

    #[test]
    fn empty_payload_decodes_as_empty_object() {
        let output = run_activity(&mut context(), "  ", |_: &mut Context, p: Defaults| {
            Ok(p.top)
        });
        assert_eq!(output.unwrap(), "0");
    }

    #[test]
    fn activity_error_passes_through() {
        let output = run_activity(&mut context(), "{}", |_: &mut Context, _: Defaults| {
            Err::<(), _>(Error::retryable("database busy"))
        });
        assert_eq!(output.unwrap_err(), Error::retryable("database busy"));
    }

    #[test]
    fn unserializable_result_is_failed() {
        let output = run_activity(&mut context(), "{}", |_: &mut Context, _: Defaults| {
            Ok(std::collections::HashMap::from([((1, 2), 3)]))
        });
        let error = output.unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Failed);
        assert!(
            error
                .message()
                .starts_with("failed to serialize the result as JSON"),
            "{}",
            error.message()
        );
    }
}

//! Input rules checked at submit on every backend, so that a value one backend rejects
//! never gets into another.
//!
//! Each check returns [`Error::Invalid`] with a message that quotes the value (shortened
//! when long) and names the rule or limit it breaks.

use crate::{Error, Result};

/// Maximum size of a task payload, in bytes of its JSON text.
pub const MAX_PAYLOAD_BYTES: usize = 1024 * 1024;

/// Maximum size of the JSON result a guest returns, in bytes.
pub const MAX_RESULT_BYTES: usize = 1024 * 1024;

/// Maximum nesting depth of objects and arrays in a payload. It bounds the recursion of
/// every JSON parser that reads the payload later, the guest's included.
pub const MAX_PAYLOAD_DEPTH: usize = 64;

/// Maximum length of a resource id in UTF-16 code units, because an Azure Table key is at
/// most 1 KiB.
pub const MAX_RESOURCE_ID_UTF16: usize = 512;

/// Maximum length of an activity type, in characters.
pub const MAX_ACTIVITY_TYPE_CHARS: usize = 128;

/// Maximum length of a table name, which is interpolated into SQL statements.
pub const MAX_TABLE_NAME_CHARS: usize = 63;

/// Maximum length of an idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 256;

/// Maximum number of characters of a value that an error message quotes.
const MAX_QUOTED_CHARS: usize = 64;

/// Checks a resource id against the Azure Table key rules, which `bgw` applies on every
/// backend: not empty, at most 512 UTF-16 code units, and none of `/`, `\`, `#`, `?` or
/// the control characters U+0000–U+001F and U+007F–U+009F.
pub fn resource_id(value: &str) -> Result<()> {
    if value.is_empty() {
        return Err(invalid("resource id must not be empty"));
    }

    let units = value.encode_utf16().count();
    if units > MAX_RESOURCE_ID_UTF16 {
        return Err(invalid(format!(
            "resource id {} is {units} UTF-16 code units long; the maximum is \
             {MAX_RESOURCE_ID_UTF16} (1 KiB, the Azure Table key limit)",
            quote(value)
        )));
    }

    for (index, ch) in value.chars().enumerate() {
        let rule = if matches!(ch, '/' | '\\' | '#' | '?') {
            "the characters /, \\, # and ? are not allowed in Azure Table keys"
        } else if is_control(ch) {
            "control characters U+0000-U+001F and U+007F-U+009F are not allowed in Azure Table keys"
        } else {
            continue;
        };
        return Err(invalid(format!(
            "resource id {} contains {} at character index {index}: {rule}",
            quote(value),
            describe_char(ch)
        )));
    }
    Ok(())
}

/// Checks that a task id is a hyphenated UUID of any version.
pub fn task_id(value: &str) -> Result<()> {
    let hyphenated = value.len() == 36 && value.as_bytes()[8] == b'-';
    if hyphenated && uuid::Uuid::try_parse(value).is_ok() {
        return Ok(());
    }
    Err(invalid(format!(
        "task id {} is not a UUID in hyphenated form such as \
         0190b2a4-7c1e-7a3b-9d2f-4e5a6b7c8d9e",
        quote(value)
    )))
}

/// Checks an activity type: 1 to 128 ASCII letters, digits, `_`, `-` or `.`, starting with a
/// letter or digit.
pub fn activity_type(value: &str) -> Result<()> {
    const RULE: &str = "an activity type is 1 to 128 ASCII letters, digits, '_', '-' or '.', \
                        starting with a letter or digit";

    let Some(first) = value.chars().next() else {
        return Err(invalid(format!("activity type must not be empty; {RULE}")));
    };
    let length = value.chars().count();
    if length > MAX_ACTIVITY_TYPE_CHARS {
        return Err(invalid(format!(
            "activity type {} is {length} characters long; the maximum is \
             {MAX_ACTIVITY_TYPE_CHARS}",
            quote(value)
        )));
    }
    if !first.is_ascii_alphanumeric() {
        return Err(invalid(format!(
            "activity type {} starts with {}; {RULE}",
            quote(value),
            describe_char(first)
        )));
    }
    let allowed = |ch: char| ch.is_ascii_alphanumeric() || matches!(ch, '_' | '-' | '.');
    if let Some((index, ch)) = value.chars().enumerate().find(|&(_, ch)| !allowed(ch)) {
        return Err(invalid(format!(
            "activity type {} contains {} at character index {index}; {RULE}",
            quote(value),
            describe_char(ch)
        )));
    }
    Ok(())
}

/// Checks an idempotency key: 1 to [`MAX_IDEMPOTENCY_KEY_BYTES`] bytes.
pub fn idempotency_key(value: &str) -> Result<()> {
    if (1..=MAX_IDEMPOTENCY_KEY_BYTES).contains(&value.len()) {
        return Ok(());
    }
    Err(invalid(format!(
        "invalid idempotency key of {} bytes: it must have 1 to {MAX_IDEMPOTENCY_KEY_BYTES} bytes",
        value.len()
    )))
}

/// Checks a task payload and returns it parsed.
///
/// The payload must be at most [`MAX_PAYLOAD_BYTES`], valid UTF-8, valid JSON, nested at
/// most [`MAX_PAYLOAD_DEPTH`] levels deep, and a JSON object.
pub fn payload(bytes: &[u8]) -> Result<serde_json::Value> {
    if bytes.len() > MAX_PAYLOAD_BYTES {
        return Err(invalid(format!(
            "payload is {} bytes; the maximum is {MAX_PAYLOAD_BYTES} bytes (1 MiB)",
            bytes.len()
        )));
    }

    let text = std::str::from_utf8(bytes).map_err(|error| {
        let offset = error.valid_up_to();
        invalid(format!(
            "payload is not valid UTF-8: invalid byte 0x{:02x} at byte offset {offset}",
            bytes[offset]
        ))
    })?;

    if let Some(offset) = first_offset_deeper_than(text.as_bytes(), MAX_PAYLOAD_DEPTH) {
        return Err(invalid(format!(
            "payload nests objects and arrays deeper than the limit of {MAX_PAYLOAD_DEPTH} \
             levels (level {} starts at byte offset {offset})",
            MAX_PAYLOAD_DEPTH + 1
        )));
    }

    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|error| invalid(format!("payload is not valid JSON: {error}")))?;
    if !value.is_object() {
        return Err(invalid(format!(
            "payload must be a JSON object, but it is {}: {}",
            json_kind(&value),
            quote(text.trim())
        )));
    }
    Ok(value)
}

/// Checks the JSON result a guest returned: at most [`MAX_RESULT_BYTES`] and valid JSON.
pub fn result(text: &str) -> Result<()> {
    if text.len() > MAX_RESULT_BYTES {
        return Err(invalid(format!(
            "result is {} bytes; the maximum is {MAX_RESULT_BYTES} bytes (1 MiB)",
            text.len()
        )));
    }
    serde_json::from_str::<serde::de::IgnoredAny>(text)
        .map(|_| ())
        .map_err(|error| invalid(format!("result {} is not valid JSON: {error}", quote(text))))
}

/// Checks the names a backend is opened with: two SQL-safe table names that differ, and an
/// Azure queue name.
pub fn backend_names(active_table: &str, finished_table: &str, queue_name: &str) -> Result<()> {
    table_name(active_table)?;
    table_name(finished_table)?;
    if active_table.eq_ignore_ascii_case(finished_table) {
        return Err(Error::Invalid(format!(
            "the active and the finished table must differ, but both are {active_table:?}"
        )));
    }
    azure_name("queue name", queue_name)
}

/// Checks a table name, which SQL statements interpolate: 1 to 63 ASCII letters, digits or
/// underscores, starting with a letter.
pub fn table_name(value: &str) -> Result<()> {
    let starts_with_letter = value
        .chars()
        .next()
        .is_some_and(|ch| ch.is_ascii_alphabetic());
    let allowed = value
        .chars()
        .all(|ch| ch.is_ascii_alphanumeric() || ch == '_');
    if starts_with_letter && allowed && value.len() <= MAX_TABLE_NAME_CHARS {
        return Ok(());
    }
    Err(invalid(format!(
        "invalid table name {}: a table name is 1 to {MAX_TABLE_NAME_CHARS} ASCII letters, \
         digits or underscores, starting with a letter",
        quote(value)
    )))
}

/// Checks a name against the Azure rules for blob containers, which are also those for
/// queues: 3 to 63 lower-case letters, digits and single hyphens, starting and ending with a
/// letter or digit. `kind` names the value in the error, such as "container name".
pub fn azure_name(kind: &str, value: &str) -> Result<()> {
    let allowed = value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    let ends_ok = !value.starts_with('-') && !value.ends_with('-');
    let length_ok = (3..=63).contains(&value.len());
    if allowed && ends_ok && length_ok && !value.contains("--") {
        return Ok(());
    }
    Err(invalid(format!(
        "invalid {kind} {}: it must be 3 to 63 lower-case letters, digits and single \
         hyphens, starting and ending with a letter or digit (Azure naming rules)",
        quote(value)
    )))
}

/// Returns true for the control characters U+0000–U+001F and U+007F–U+009F.
pub(crate) fn is_control(ch: char) -> bool {
    matches!(ch, '\u{0}'..='\u{1f}' | '\u{7f}'..='\u{9f}')
}

/// Quotes a value for an error message with `{:?}`, shortening it when it is long.
pub(crate) fn quote(value: &str) -> String {
    let length = value.chars().count();
    if length <= MAX_QUOTED_CHARS {
        return format!("{value:?}");
    }
    let prefix: String = value.chars().take(MAX_QUOTED_CHARS).collect();
    format!("{prefix:?}... ({length} characters)")
}

/// Names a character for an error message, with its code point.
pub(crate) fn describe_char(ch: char) -> String {
    format!("{ch:?} (U+{:04X})", ch as u32)
}

fn invalid(message: impl Into<String>) -> Error {
    Error::Invalid(message.into())
}

/// Returns the byte offset of the first `{` or `[` nested deeper than `limit`, skipping
/// string contents. It runs before parsing so that the depth error is the same for any
/// depth, including those beyond the parser's own recursion limit.
fn first_offset_deeper_than(json: &[u8], limit: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for (offset, &byte) in json.iter().enumerate() {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > limit {
                    return Some(offset);
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    None
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CASES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/cases");

    fn message(result: Result<impl std::fmt::Debug>) -> String {
        match result {
            Err(Error::Invalid(message)) => message,
            other => panic!("expected Error::Invalid, got {other:?}"),
        }
    }

    fn case_file(name: &str) -> Vec<u8> {
        let path = format!("{CASES}/{name}");
        std::fs::read(&path).unwrap_or_else(|error| panic!("cannot read {path}: {error}"))
    }

    #[test]
    fn idempotency_key_length_is_checked() {
        let longest = "k".repeat(MAX_IDEMPOTENCY_KEY_BYTES);
        for key in ["k", "order-42", "日本", longest.as_str()] {
            assert!(idempotency_key(key).is_ok(), "{key:?}");
        }
        let too_long = format!("{longest}k");
        let cases = [
            ("", "invalid idempotency key of 0 bytes"),
            (too_long.as_str(), "invalid idempotency key of 257 bytes"),
        ];
        for (key, expected) in cases {
            let error = message(idempotency_key(key));
            assert!(error.starts_with(expected), "{error}");
            assert!(error.ends_with("it must have 1 to 256 bytes"), "{error}");
        }
    }

    #[test]
    fn resource_id_accepts_plain_keys() {
        for value in ["res-0001", "tenant-a", "a", "user@example.invalid", "日本"] {
            assert!(resource_id(value).is_ok(), "{value:?}");
        }
    }

    #[test]
    fn resource_id_rejects_empty() {
        assert!(message(resource_id("")).contains("must not be empty"));
    }

    #[test]
    fn resource_id_length_counts_utf16_units() {
        assert!(resource_id(&"x".repeat(512)).is_ok());
        let error = message(resource_id(&"x".repeat(513)));
        assert!(error.contains("513 UTF-16 code units"), "{error}");
        assert!(error.contains("512"), "{error}");
        assert!(error.contains("(513 characters)"), "{error}");

        // U+1F600 takes two UTF-16 code units, so 257 of them exceed the limit.
        let error = message(resource_id(&"\u{1f600}".repeat(257)));
        assert!(error.contains("514 UTF-16 code units"), "{error}");
    }

    #[test]
    fn resource_id_names_forbidden_character_and_index() {
        let error = message(resource_id("res/0001"));
        assert!(error.contains("\"res/0001\""), "{error}");
        assert!(
            error.contains("'/' (U+002F) at character index 3"),
            "{error}"
        );

        let error = message(resource_id("ab\u{85}"));
        assert!(error.contains("U+0085"), "{error}");
        assert!(error.contains("index 2"), "{error}");
        assert!(error.contains("control characters"), "{error}");
    }

    #[test]
    fn resource_id_checks_every_case_file_value() {
        let text = String::from_utf8(case_file("C04-resource-ids.json")).unwrap();
        let cases: serde_json::Value = serde_json::from_str(&text).unwrap();
        let values: Vec<&str> = cases["resource_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|value| value.as_str().unwrap())
            .collect();
        assert_eq!(values.len(), 12);

        let accepted = ["res~0001", "res-\u{640}\u{64b}-0001"];
        for value in &values {
            let result = resource_id(value);
            if accepted.contains(value) {
                assert!(result.is_ok(), "{value:?} should be accepted: {result:?}");
            } else {
                assert!(result.is_err(), "{value:?} should be rejected");
            }
        }
        for value in accepted {
            assert!(values.contains(&value), "case file lacks {value:?}");
        }
    }

    #[test]
    fn resource_id_case_messages_name_the_character() {
        let expected = [
            ("res/0001", "U+002F"),
            ("res\\0001", "U+005C"),
            ("res#0001", "U+0023"),
            ("res?0001", "U+003F"),
            ("res\t0001", "U+0009"),
            ("res\u{1}0001", "U+0001"),
            ("res\u{7f}0001", "U+007F"),
            ("a/b#c?d\\e", "U+002F"),
        ];
        for (value, code_point) in expected {
            let error = message(resource_id(value));
            assert!(error.contains(code_point), "{value:?}: {error}");
        }
    }

    #[test]
    fn task_id_accepts_hyphenated_uuids() {
        assert!(task_id(&uuid::Uuid::now_v7().to_string()).is_ok());
        assert!(task_id(&uuid::Uuid::new_v4().to_string()).is_ok());
        assert!(task_id("00000000-0000-0000-0000-000000000000").is_ok());
        assert!(task_id("0190B2A4-7C1E-7A3B-9D2F-4E5A6B7C8D9E").is_ok());
    }

    #[test]
    fn task_id_rejects_other_forms() {
        let simple = uuid::Uuid::new_v4().simple().to_string();
        let braced = uuid::Uuid::new_v4().braced().to_string();
        for value in [
            "",
            "k",
            "not-a-uuid",
            &simple,
            &braced,
            "0190b2a4-7c1e-7a3b-9d2f-4e5a6b7c8d9g",
        ] {
            let error = message(task_id(value));
            assert!(error.contains(&format!("{value:?}")), "{error}");
        }
    }

    #[test]
    fn activity_type_accepts_allowed_names() {
        for value in [
            "echo",
            "resize_v1",
            "img.resize-2",
            "9lives",
            &"a".repeat(128),
        ] {
            assert!(activity_type(value).is_ok(), "{value:?}");
        }
    }

    #[test]
    fn activity_type_rejects_broken_rules() {
        assert!(message(activity_type("")).contains("must not be empty"));
        assert!(message(activity_type(&"a".repeat(129))).contains("maximum is 128"));
        assert!(message(activity_type("_echo")).contains("starts with '_'"));
        assert!(message(activity_type(".echo")).contains("starts with '.'"));
        let error = message(activity_type("echo v2"));
        assert!(
            error.contains("' ' (U+0020) at character index 4"),
            "{error}"
        );
        assert!(message(activity_type("échо")).contains("starts with"));
        assert!(message(activity_type("a/b")).contains("'/'"));
    }

    #[test]
    fn payload_accepts_objects() {
        let value = payload(br#"{"x": 1, "nested": {"list": [1, 2, 3]}}"#).unwrap();
        assert_eq!(value["x"], 1);
        assert!(payload(b"{}").is_ok());
    }

    #[test]
    fn payload_accepts_case_files_under_limit() {
        for name in [
            "C05-payload-45000.json",
            "C05-payload-49500.json",
            "C05-payload-70000.json",
            "C05-payload-multibyte.json",
        ] {
            let bytes = case_file(name);
            assert!(bytes.len() < MAX_PAYLOAD_BYTES, "{name}");
            let result = payload(&bytes);
            assert!(result.is_ok(), "{name}: {result:?}");
        }
    }

    #[test]
    fn payload_rejects_invalid_utf8_with_offset() {
        let error = message(payload(b"{\"a\": \"\xff\"}"));
        assert!(error.contains("0xff at byte offset 7"), "{error}");
    }

    #[test]
    fn payload_rejects_invalid_json_with_position() {
        let error = message(payload(b"{\n  \"a\": 1,\n  oops\n}"));
        assert!(error.contains("not valid JSON"), "{error}");
        assert!(error.contains("line 3 column 3"), "{error}");
    }

    #[test]
    fn payload_rejects_non_objects() {
        let error = message(payload(b"[1, 2]"));
        assert!(error.contains("must be a JSON object"), "{error}");
        assert!(error.contains("an array"), "{error}");
        assert!(message(payload(b"42")).contains("a number"));
        assert!(message(payload(b"null")).contains("null"));
    }

    #[test]
    fn payload_depth_limit_is_64() {
        let nested = |levels: usize| {
            let mut text = "{\"a\": ".repeat(levels - 1);
            text.push_str("{}");
            text.push_str(&"}".repeat(levels - 1));
            text
        };
        assert!(payload(nested(64).as_bytes()).is_ok());
        let error = message(payload(nested(65).as_bytes()));
        assert!(error.contains("limit of 64 levels"), "{error}");
        // Beyond serde_json's own recursion limit of 128 the error is the same.
        assert!(message(payload(nested(1000).as_bytes())).contains("limit of 64 levels"));
        // Brackets inside strings do not count.
        let in_string = format!("{{\"a\": \"{}\"}}", "[{".repeat(100));
        assert!(payload(in_string.as_bytes()).is_ok());
    }

    #[test]
    fn payload_size_limit_names_size_and_limit() {
        let filler = "x".repeat(MAX_PAYLOAD_BYTES - r#"{"a": ""}"#.len());
        let exact = format!("{{\"a\": \"{filler}\"}}");
        assert_eq!(exact.len(), MAX_PAYLOAD_BYTES);
        assert!(payload(exact.as_bytes()).is_ok());

        let over = format!("{{\"a\": \"{filler}x\"}}");
        let error = message(payload(over.as_bytes()));
        assert!(error.contains("1048577 bytes"), "{error}");
        assert!(error.contains("maximum is 1048576 bytes"), "{error}");
    }

    #[test]
    fn result_requires_json_within_limit() {
        assert!(result("{\"ok\": true}").is_ok());
        assert!(result("42").is_ok());
        assert!(message(result("")).contains("not valid JSON"));
        assert!(message(result("{oops")).contains("line 1 column 2"));
        let big = format!("\"{}\"", "x".repeat(MAX_RESULT_BYTES));
        assert!(message(result(&big)).contains("maximum is 1048576 bytes"));
    }

    #[test]
    fn table_name_is_sql_identifier() {
        for value in [
            "ActiveTasks",
            "FinishedTasks",
            "t",
            "Tasks_2",
            &"a".repeat(63),
        ] {
            assert!(table_name(value).is_ok(), "{value:?}");
        }
        for value in [
            "",
            "2tasks",
            "_t",
            "a-b",
            "a b",
            "t;drop",
            "\"t\"",
            &"a".repeat(64),
        ] {
            let error = message(table_name(value));
            assert!(error.contains(&format!("{value:?}")), "{error}");
        }
    }

    #[test]
    fn azure_name_rules() {
        for value in ["abc", "bgw-tasks", "a1-b2-c3", &"a".repeat(63)] {
            assert!(azure_name("queue name", value).is_ok(), "{value:?}");
        }
        for value in [
            "ab",
            "-abc",
            "abc-",
            "a--b",
            "ABC",
            "a_b",
            "a.b",
            &"a".repeat(64),
        ] {
            let error = message(azure_name("queue name", value));
            assert!(error.starts_with("invalid queue name"), "{error}");
        }
    }
}

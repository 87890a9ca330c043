//! Task records as Azure Table entities, in the format `background-workflows` 0.3.0 writes.
//!
//! The Python library's properties are all `Edm.String` except `StartTime` and `EndTime`,
//! which are `Edm.DateTime` with six fraction digits and `Z`. A property whose value is
//! missing is left out. `bgw`'s own fields are extra properties, which the Python library
//! ignores: integers as `Edm.Int32` (or `Edm.Int64` for `FuelUsed`), times as
//! `Edm.DateTime`, `CancelRequested` as `Edm.Boolean` and `AttemptHistory` as a JSON string.
//! `LeaseMessageId` and `LeaseDequeueCount` name the queue message, and the delivery of it,
//! whose lease last wrote the record.
//!
//! A string property may hold at most 32K UTF-16 code units. A longer value (a large
//! payload, result, log or error) is stored in the blob container
//! [`PAYLOAD_CONTAINER`](super::PAYLOAD_CONTAINER), and the property holds the JSON
//! reference `{"bgw_blob": "bgw-payloads/<task id>/<property>-<digest>"}`. The property
//! `<name>Blob` holds the same `container/name`, which tells `bgw` to read the blob back.

use azure_storage_blobs::prelude::BlobServiceClient;
use chrono::{DateTime, Datelike, Utc};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use futures::StreamExt;

use super::{azure_error, status_of, PAYLOAD_CONTAINER};
use crate::backend::Lease;
use crate::record::{format_time, parse_time, AttemptSummary, Status, TaskRecord};
use crate::{Error, Result};

/// An entity's properties, with their `@odata.type` annotations.
pub(super) type Entity = Map<String, Value>;

/// Maximum string value kept in a property, in UTF-16 code units. The service limit is
/// 32,768 (64 KiB); a longer value goes to a blob.
pub(super) const MAX_PROPERTY_UTF16: usize = 32_000;

/// Earliest time an `Edm.DateTime` property can hold.
const MIN_YEAR: i32 = 1601;

/// String properties that may be moved to a blob when they are too long.
const OFFLOADABLE: [&str; 6] = [
    "InputPayload",
    "OutputPayload",
    "ErrorMessage",
    "TaskLog",
    "AttemptHistory",
    "ProgressMessage",
];

/// Builds the entity of a record, storing over-long values as blobs.
///
/// `lease` is the lease the record is written under, if any.
pub(super) async fn to_entity(
    blobs: &BlobServiceClient,
    record: &TaskRecord,
    lease: Option<&Lease>,
) -> Result<Entity> {
    let mut entity = Entity::new();
    let mut text = |name: &str, value: &str| {
        entity.insert(name.to_owned(), Value::String(value.to_owned()));
    };
    text("PartitionKey", &record.partition_key);
    text("RowKey", &record.row_key);
    text("TaskType", &record.task_type);
    text("Status", record.status.as_str());
    text("InputPayload", &record.input_payload);
    text("OutputPayload", &record.output_payload);
    text("BatchID", &record.batch_id);

    let optional_text = [
        ("ErrorMessage", &record.error_message),
        ("ContainerName", &record.container_name),
        ("BlobName", &record.blob_name),
        ("ComponentDigest", &record.component_digest),
        ("ProgressMessage", &record.progress_message),
        ("OutputContainerName", &record.output_container_name),
        ("OutputBlobName", &record.output_blob_name),
        ("TaskLog", &record.task_log),
        ("HostId", &record.host_id),
        ("IdempotencyKey", &record.idempotency_key),
    ];
    for (name, value) in optional_text {
        if let Some(value) = value {
            entity.insert(name.to_owned(), Value::String(value.clone()));
        }
    }
    if let Some(lease) = lease {
        set_lease(&mut entity, lease);
    }

    let times = [
        ("StartTime", record.start_time),
        ("EndTime", record.end_time),
        ("CreatedTime", record.created_time),
        ("DeadlineTime", record.deadline_time),
        ("ComponentWaitStart", record.component_wait_start),
    ];
    for (name, time) in times {
        if let Some(time) = time {
            set_time(&mut entity, name, &time)?;
        }
    }

    entity.insert("Attempt".to_owned(), Value::from(record.attempt));
    if let Some(version) = record.component_version {
        entity.insert("ComponentVersion".to_owned(), Value::from(version));
    }
    if let Some(progress) = record.progress {
        entity.insert("Progress".to_owned(), Value::from(progress));
    }
    if let Some(fuel) = record.fuel_used {
        entity.insert("FuelUsed".to_owned(), Value::String(fuel.to_string()));
        entity.insert("FuelUsed@odata.type".to_owned(), "Edm.Int64".into());
    }
    if !record.attempt_history.is_empty() {
        let history =
            serde_json::to_string(&record.attempt_history).expect("attempt summaries serialize");
        entity.insert("AttemptHistory".to_owned(), Value::String(history));
    }
    entity.insert(
        "CancelRequested".to_owned(),
        Value::Bool(record.cancel_requested),
    );

    offload_long_values(blobs, &mut entity, &record.row_key).await?;
    Ok(entity)
}

/// Sets the properties that name the message and the delivery whose lease writes the entity.
pub(super) fn set_lease(entity: &mut Entity, lease: &Lease) {
    entity.insert(
        "LeaseMessageId".to_owned(),
        Value::String(lease.message_id.clone()),
    );
    entity.insert(
        "LeaseDequeueCount".to_owned(),
        Value::from(lease.dequeue_count),
    );
}

/// Sets an `Edm.DateTime` property, rejecting times before 1601, which the table service
/// cannot store.
pub(super) fn set_time(entity: &mut Entity, name: &str, time: &DateTime<Utc>) -> Result<()> {
    if time.year() < MIN_YEAR {
        return Err(Error::Invalid(format!(
            "invalid {name} {}: Azure Table Storage stores no time before \
             1601-01-01T00:00:00Z",
            format_time(time)
        )));
    }
    entity.insert(name.to_owned(), Value::String(format_time(time)));
    entity.insert(format!("{name}@odata.type"), "Edm.DateTime".into());
    Ok(())
}

/// Removes a property and its type annotation.
pub(super) fn remove_property(entity: &mut Entity, name: &str) {
    entity.remove(name);
    entity.remove(&format!("{name}@odata.type"));
    entity.remove(&format!("{name}Blob"));
}

/// Moves every over-long offloadable property to a blob named by its content, so that
/// two hosts writing different values never overwrite each other's blob.
async fn offload_long_values(
    blobs: &BlobServiceClient,
    entity: &mut Entity,
    task_id: &str,
) -> Result<()> {
    for name in OFFLOADABLE {
        let Some(Value::String(value)) = entity.get(name) else {
            continue;
        };
        if value.encode_utf16().count() <= MAX_PROPERTY_UTF16 {
            continue;
        }
        let digest = hex::encode(&Sha256::digest(value.as_bytes())[..8]);
        let blob_name = format!("{task_id}/{name}-{digest}");
        put_payload_blob(blobs, &blob_name, value.as_bytes().to_vec()).await?;

        let reference = format!("{PAYLOAD_CONTAINER}/{blob_name}");
        let reference_json = serde_json::json!({ "bgw_blob": reference }).to_string();
        entity.insert(name.to_owned(), Value::String(reference_json));
        entity.insert(format!("{name}Blob"), Value::String(reference));
    }
    Ok(())
}

/// Stores bytes in the payload container.
pub(super) async fn put_payload_blob(
    blobs: &BlobServiceClient,
    name: &str,
    bytes: Vec<u8>,
) -> Result<()> {
    blobs
        .container_client(PAYLOAD_CONTAINER)
        .blob_client(name)
        .put_block_blob(bytes)
        .await
        .map_err(|error| {
            azure_error(
                format!("failed to store blob {name:?} in container {PAYLOAD_CONTAINER}"),
                error,
            )
        })?;
    Ok(())
}

/// Deletes every blob of a task in the payload container: the long values of its entity
/// and the payload of a message too large for the queue, all named `<task id>/...`.
/// A task without such blobs is not an error.
pub(super) async fn delete_payload_blobs(blobs: &BlobServiceClient, task_id: &str) -> Result<()> {
    let container = blobs.container_client(PAYLOAD_CONTAINER);
    let failed = |error| {
        azure_error(
            format!(
                "failed to delete the blobs of task {task_id} in container {PAYLOAD_CONTAINER}"
            ),
            error,
        )
    };
    let mut names = Vec::new();
    let mut pages = container
        .list_blobs()
        .prefix(format!("{task_id}/"))
        .into_stream();
    while let Some(page) = pages.next().await {
        match page {
            Ok(page) => names.extend(page.blobs.blobs().map(|blob| blob.name.clone())),
            Err(error) if status_of(&error) == Some(404) => break,
            Err(error) => return Err(failed(error)),
        }
    }
    for name in names {
        match container.blob_client(&name).delete().await {
            Ok(_) => {}
            Err(error) if status_of(&error) == Some(404) => {}
            Err(error) => return Err(failed(error)),
        }
    }
    Ok(())
}

/// Reads a blob that an entity property refers to as `container/name`.
pub(super) async fn read_reference(blobs: &BlobServiceClient, reference: &str) -> Result<String> {
    let (container, name) = reference.split_once('/').ok_or_else(|| {
        Error::Invalid(format!(
            "invalid blob reference {reference:?}: expected container/name"
        ))
    })?;
    let bytes = blobs
        .container_client(container)
        .blob_client(name)
        .get_content()
        .await
        .map_err(|error| azure_error(format!("failed to read blob {reference:?}"), error))?;
    String::from_utf8(bytes)
        .map_err(|error| Error::Invalid(format!("blob {reference:?} is not UTF-8: {error}")))
}

/// Replaces each property that refers to a blob with the blob's text.
pub(super) async fn load_long_values(blobs: &BlobServiceClient, entity: &mut Entity) -> Result<()> {
    for name in OFFLOADABLE {
        let Some(Value::String(reference)) = entity.get(&format!("{name}Blob")) else {
            continue;
        };
        let text = read_reference(blobs, &reference.clone()).await?;
        entity.insert(name.to_owned(), Value::String(text));
    }
    Ok(())
}

/// Removes the metadata a query or get returns (`odata.*`, `Timestamp`), leaving the
/// properties and their type annotations, so that the entity can be written back.
pub(super) fn strip_metadata(entity: &mut Entity) -> Option<String> {
    let etag = entity
        .get("odata.etag")
        .and_then(Value::as_str)
        .map(str::to_owned);
    entity.retain(|key, _| !key.starts_with("odata.") && !key.starts_with("Timestamp"));
    etag
}

/// Reads a record from an entity whose long values were already loaded.
///
/// As on SQLite, a time or number that does not parse is read as missing, so that one
/// bad value written by another program cannot make the task unreadable. An unknown
/// status is an error.
pub(super) fn from_entity(entity: &Entity, table: &str) -> Result<TaskRecord> {
    let row_key = string(entity, "RowKey").unwrap_or_default();
    let status_text = string(entity, "Status").unwrap_or_default();
    let status: Status = status_text
        .parse()
        .map_err(|error| Error::Invalid(format!("task {row_key:?} in table {table}: {error}")))?;
    let time = |name: &str| time(entity, name, &row_key);

    Ok(TaskRecord {
        partition_key: string(entity, "PartitionKey").unwrap_or_default(),
        task_type: string(entity, "TaskType").unwrap_or_default(),
        status,
        input_payload: string(entity, "InputPayload").unwrap_or_default(),
        output_payload: string(entity, "OutputPayload").unwrap_or_default(),
        start_time: time("StartTime"),
        end_time: time("EndTime"),
        batch_id: string(entity, "BatchID").unwrap_or_default(),
        error_message: string(entity, "ErrorMessage"),
        container_name: string(entity, "ContainerName"),
        blob_name: string(entity, "BlobName"),
        attempt: integer(entity, "Attempt")
            .map_or(0, |value| value.clamp(0, u32::MAX.into()) as u32),
        component_digest: string(entity, "ComponentDigest"),
        component_version: integer(entity, "ComponentVersion").and_then(|v| u32::try_from(v).ok()),
        fuel_used: integer(entity, "FuelUsed").and_then(|value| u64::try_from(value).ok()),
        progress: integer(entity, "Progress").map(|value| value.clamp(0, 100) as u8),
        progress_message: string(entity, "ProgressMessage"),
        output_container_name: string(entity, "OutputContainerName"),
        output_blob_name: string(entity, "OutputBlobName"),
        task_log: string(entity, "TaskLog"),
        host_id: string(entity, "HostId"),
        created_time: time("CreatedTime"),
        attempt_history: attempt_history(entity, &row_key),
        deadline_time: time("DeadlineTime"),
        idempotency_key: string(entity, "IdempotencyKey"),
        cancel_requested: entity
            .get("CancelRequested")
            .is_some_and(|value| value.as_bool() == Some(true) || value == "true"),
        component_wait_start: time("ComponentWaitStart"),
        row_key,
    })
}

/// Returns a string property; a number or boolean is converted to text.
pub(super) fn string(entity: &Entity, name: &str) -> Option<String> {
    match entity.get(name)? {
        Value::String(text) => Some(text.clone()),
        Value::Null => None,
        other => Some(other.to_string()),
    }
}

/// Returns an integer property stored as a JSON number or as decimal text.
pub(super) fn integer(entity: &Entity, name: &str) -> Option<i64> {
    match entity.get(name)? {
        Value::Number(number) => number.as_i64(),
        Value::String(text) => text.trim().parse().ok(),
        _ => None,
    }
}

fn time(entity: &Entity, name: &str, task_id: &str) -> Option<DateTime<Utc>> {
    let text = string(entity, name)?;
    match parse_time(&text) {
        Ok(time) => Some(time),
        Err(error) => {
            tracing::warn!(task_id, property = name, %error, "ignoring unreadable time");
            None
        }
    }
}

fn attempt_history(entity: &Entity, task_id: &str) -> Vec<AttemptSummary> {
    let Some(text) = string(entity, "AttemptHistory").filter(|text| !text.trim().is_empty()) else {
        return Vec::new();
    };
    match serde_json::from_str(&text) {
        Ok(history) => history,
        Err(error) => {
            tracing::warn!(task_id, %error, "ignoring unreadable attempt history");
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entity_of(pairs: &[(&str, Value)]) -> Entity {
        pairs
            .iter()
            .map(|(key, value)| (key.to_string(), value.clone()))
            .collect()
    }

    #[test]
    fn python_entity_reads_as_record() {
        let entity = entity_of(&[
            ("PartitionKey", "res-1".into()),
            ("RowKey", "abc".into()),
            ("TaskType", "multiply".into()),
            ("Status", "CREATED".into()),
            ("InputPayload", r#"{"x": 21}"#.into()),
            ("OutputPayload", "".into()),
            ("BatchID", "".into()),
        ]);
        let record = from_entity(&entity, "ActiveTasks").unwrap();
        assert_eq!(record.partition_key, "res-1");
        assert_eq!(record.status, Status::Created);
        assert_eq!(record.attempt, 0);
        assert_eq!(record.start_time, None);
        assert!(!record.cancel_requested);
    }

    #[test]
    fn seven_digit_datetime_is_read() {
        let entity = entity_of(&[
            ("RowKey", "abc".into()),
            ("Status", "RUNNING".into()),
            ("StartTime", "2014-09-02T21:09:14.8848547Z".into()),
            ("StartTime@odata.type", "Edm.DateTime".into()),
        ]);
        let record = from_entity(&entity, "ActiveTasks").unwrap();
        let start = record.start_time.unwrap();
        assert_eq!(start.timestamp_subsec_nanos(), 884_854_700);
    }

    #[test]
    fn time_before_1601_is_rejected() {
        let mut entity = Entity::new();
        let time = parse_time("1600-12-31T23:59:59Z").unwrap();
        let error = set_time(&mut entity, "StartTime", &time).unwrap_err();
        assert!(error.to_string().contains("1601"), "{error}");
    }

    #[test]
    fn unknown_status_names_task() {
        let entity = entity_of(&[("RowKey", "abc".into()), ("Status", "DONE".into())]);
        let error = from_entity(&entity, "ActiveTasks").unwrap_err().to_string();
        assert!(error.contains("abc"), "names the task: {error}");
        assert!(error.contains("DONE"), "names the status: {error}");
    }
}

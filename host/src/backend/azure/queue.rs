//! The task queue on Azure Storage Queues, and dead letters in a table.
//!
//! Message text is sent as is, without base64, exactly as `background-workflows` writes
//! it. A lease is a get with a visibility timeout; extending or releasing it updates the
//! message, which returns a new pop receipt that replaces the old one, because only the
//! newest receipt can update or delete the message.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use azure_storage_queues::prelude::{NumberOfMessages, PopReceipt, VisibilityTimeout};
use chrono::{DateTime, Utc};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::entity::{
    integer, put_payload_blob, read_reference, set_time, string, Entity, MAX_PROPERTY_UTF16,
};
use super::store::find_task;
use super::table;
use super::{azure_error, concurrently, status_of, AzureBackend, Shared, PAYLOAD_CONTAINER};
use crate::backend::{instant_after, DeadLetter, Fenced, Lease, OutgoingMessage, TaskQueue};
use crate::record::{to_python_json, QueueMessage, Status};
use crate::{Error, Result};

/// Largest message Azure Queues accepts, in bytes of the XML-escaped text.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// Largest number of messages one get returns.
const MAX_MESSAGES_PER_GET: usize = 32;

/// Shortest time a finishing write hides the message for while it writes the tables.
const MIN_FINISH_VISIBILITY: Duration = Duration::from_secs(1);

/// Returns how long a finishing write hides a leased message: the time its lease has left,
/// but at least [`MIN_FINISH_VISIBILITY`]. A host that dies during the writes leaves the
/// message hidden no longer than its lease would have, and the duplicate delivery that
/// follows is acknowledged.
///
/// The time left is measured on the monotonic clock. The lease's `visible_at` is on the
/// service's clock, so a host whose wall clock is ahead would hide the message for only
/// the minimum, and one behind for far longer than its lease.
pub(super) fn finish_visibility(lease: &Lease) -> Duration {
    let left = lease.held_until.saturating_duration_since(Instant::now());
    left.max(MIN_FINISH_VISIBILITY)
}

/// Maximum pause of `wait_for_change` between polls of an empty queue.
const MAX_IDLE_PAUSE: Duration = Duration::from_secs(1);

#[async_trait]
impl TaskQueue for AzureBackend {
    async fn enqueue(&self, messages: &[OutgoingMessage]) -> Result<()> {
        let shared = self.ready().await?;
        for message in messages {
            shared.put_message(message).await?;
        }
        Ok(())
    }

    async fn lease(&self, max: usize, visibility: Duration) -> Result<Vec<Lease>> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let shared = self.ready().await?;
        let count = max.min(MAX_MESSAGES_PER_GET) as u8;
        let visibility = whole_seconds(visibility);
        let held_until = instant_after(visibility);
        let response = shared
            .queue
            .get_messages()
            .number_of_messages(NumberOfMessages::new(count))
            .visibility_timeout(VisibilityTimeout::new(visibility))
            .await
            .map_err(|error| {
                azure_error(
                    format!("failed to get messages from queue {}", shared.queue_name),
                    error,
                )
            })?;
        let leases: Vec<Lease> = response
            .messages
            .into_iter()
            .map(|message| Lease {
                message_id: message.message_id,
                pop_receipt: message.pop_receipt,
                dequeue_count: u32::try_from(message.dequeue_count).unwrap_or(u32::MAX),
                body: message.message_text,
                inserted_at: chrono_time(message.insertion_time),
                visible_at: chrono_time(message.time_next_visible),
                held_until,
            })
            .collect();
        match leases.is_empty() {
            true => shared.empty_polls.fetch_add(1, Ordering::Relaxed),
            false => shared.empty_polls.swap(0, Ordering::Relaxed),
        };
        Ok(leases)
    }

    async fn extend(&self, lease: &Lease, visibility: Duration) -> Result<Option<Lease>> {
        let shared = self.ready().await?;
        shared.update_visibility(lease, visibility).await
    }

    async fn release(&self, lease: &Lease, delay: Duration) -> Result<Fenced> {
        let shared = self.ready().await?;
        Ok(fenced(
            shared.update_visibility(lease, delay).await?.is_some(),
        ))
    }

    async fn delete(&self, leases: &[Lease]) -> Result<Vec<Fenced>> {
        let shared = self.ready().await?;
        let deletes: Vec<_> = leases
            .iter()
            .map(|lease| shared.delete_message(lease))
            .collect();
        concurrently(deletes)
            .await
            .into_iter()
            .map(|deleted| Ok(fenced(deleted?)))
            .collect()
    }

    async fn dead_letter(&self, lease: &Lease, reason: &str) -> Result<Fenced> {
        let shared = self.ready().await?;
        // Renewing the lease proves it is still held and gives the receipt to delete with.
        let Some(held) = shared
            .update_visibility(lease, finish_visibility(lease))
            .await?
        else {
            return Ok(Fenced::LeaseLost);
        };
        Ok(fenced(shared.move_to_dead_letters(&held, reason).await?))
    }

    async fn list_dead_letters(&self) -> Result<Vec<DeadLetter>> {
        let shared = self.ready().await?;
        let filter = table::equals("PartitionKey", &shared.queue_name);
        let mut letters = Vec::new();
        // Row keys count down with time, so the query returns the newest first.
        for (entity, _) in table::query(&shared.dead_letters, Some(filter)).await? {
            letters.push(shared.dead_letter_of(&entity).await?);
        }
        Ok(letters)
    }

    async fn requeue_dead_letter(&self, id: &str) -> Result<bool> {
        check_dead_letter_id(id)?;
        let shared = self.ready().await?;
        let Some((entity, _)) = table::get(&shared.dead_letters, &shared.queue_name, id).await?
        else {
            return Ok(false);
        };
        let letter = shared.dead_letter_of(&entity).await?;
        shared
            .put_message(&OutgoingMessage {
                body: letter.body.clone(),
                delay: Duration::ZERO,
            })
            .await?;
        if let Some(task_id) = &letter.row_key {
            reopen_failed_task(shared, letter.resource_id.as_deref(), task_id).await?;
        }
        table::delete(&shared.dead_letters, &shared.queue_name, id, None).await?;
        Ok(true)
    }

    async fn queue_length(&self) -> Result<u64> {
        let shared = self.ready().await?;
        let metadata = shared.queue.get_metadata().await.map_err(|error| {
            azure_error(
                format!("failed to read the length of queue {}", shared.queue_name),
                error,
            )
        })?;
        Ok(metadata.approximate_messages_count as u64)
    }

    /// Sleeps, because Azure Queues has no change signal: a few milliseconds after a
    /// lease found work, doubling with each empty poll up to one second or `timeout`.
    async fn wait_for_change(&self, timeout: Duration) {
        let empty_polls = self.shared.empty_polls.load(Ordering::Relaxed).min(10);
        let pause = (Duration::from_millis(10) * (1 << empty_polls))
            .min(MAX_IDLE_PAUSE)
            .min(timeout);
        tokio::time::sleep(pause).await;
    }
}

impl Shared {
    /// Puts a message on the queue, first moving a payload too large for a message to a
    /// blob.
    pub(super) async fn put_message(&self, message: &OutgoingMessage) -> Result<()> {
        self.put_hidden_message(&message.body, message.delay)
            .await
            .map(drop)
    }

    /// Puts a message that stays hidden for `visibility`, first moving a payload too large
    /// for a message to a blob. Returns the message as a lease whose pop receipt can
    /// update or delete it until a consumer gets it.
    pub(super) async fn put_hidden_message(
        &self,
        body: &str,
        visibility: Duration,
    ) -> Result<Lease> {
        let body = self.fit_message(body).await?;
        // Taken before the request, so it never outlasts the hidden time the service counts.
        let held_until = instant_after(visibility);
        let mut builder = self.queue.put_message(body.clone());
        if !visibility.is_zero() {
            builder = builder.visibility_timeout(VisibilityTimeout::new(whole_seconds(visibility)));
        }
        let response = builder.await.map_err(|error| {
            azure_error(
                format!("failed to put a message on queue {}", self.queue_name),
                error,
            )
        })?;
        let message = response.queue_message;
        Ok(Lease {
            message_id: message.message_id,
            pop_receipt: message.pop_receipt,
            dequeue_count: 0,
            body,
            inserted_at: chrono_time(message.insertion_time),
            visible_at: chrono_time(message.time_next_visible),
            held_until,
        })
    }

    /// Returns the body unchanged when it fits a message. A task message whose payload
    /// makes it too large gets the payload replaced by the reference
    /// `{"bgw_blob": "bgw-payloads/<task id>/message-payload-<digest>"}`; the daemon reads
    /// the payload from the record, so nothing is lost.
    async fn fit_message(&self, body: &str) -> Result<String> {
        let size = encoded_size(body);
        if size <= MAX_MESSAGE_BYTES {
            return Ok(body.to_owned());
        }
        let too_large = |size: usize| {
            Error::Invalid(format!(
                "queue message is {size} bytes after XML escaping; Azure Queues accepts at \
                 most {MAX_MESSAGE_BYTES} bytes (64 KiB)"
            ))
        };
        let Ok(mut message) = QueueMessage::parse(body) else {
            return Err(too_large(size));
        };
        let payload = to_python_json(&message.payload);
        let digest = hex::encode(&Sha256::digest(payload.as_bytes())[..8]);
        let name = format!("{}/message-payload-{digest}", message.row_key);
        put_payload_blob(&self.blob_service, &name, payload.into_bytes()).await?;
        message.payload = serde_json::json!({ "bgw_blob": format!("{PAYLOAD_CONTAINER}/{name}") });

        let body = message.to_python_json();
        let size = encoded_size(&body);
        match size <= MAX_MESSAGE_BYTES {
            true => Ok(body),
            false => Err(too_large(size)),
        }
    }

    /// Sets a leased message's visibility timeout, returning the lease with its new pop
    /// receipt, or `None` when the receipt is no longer the newest.
    pub(super) async fn update_visibility(
        &self,
        lease: &Lease,
        visibility: Duration,
    ) -> Result<Option<Lease>> {
        let receipt = PopReceipt::new(lease.message_id.clone(), lease.pop_receipt.clone());
        let visibility = whole_seconds(visibility);
        let held_until = instant_after(visibility);
        let result = self
            .queue
            .pop_receipt_client(receipt)
            .update(lease.body.clone(), VisibilityTimeout::new(visibility))
            .await;
        match result {
            Ok(response) => Ok(Some(Lease {
                pop_receipt: response.pop_receipt,
                visible_at: chrono_time(response.time_next_visible),
                held_until,
                ..lease.clone()
            })),
            Err(error) if lease_lost(&error) => Ok(None),
            Err(error) => Err(azure_error(
                format!("failed to update message {}", lease.message_id),
                error,
            )),
        }
    }

    /// Deletes a leased message; false when the receipt is no longer the newest.
    pub(super) async fn delete_message(&self, lease: &Lease) -> Result<bool> {
        let receipt = PopReceipt::new(lease.message_id.clone(), lease.pop_receipt.clone());
        match self.queue.pop_receipt_client(receipt).delete().await {
            Ok(_) => Ok(true),
            Err(error) if lease_lost(&error) => Ok(false),
            Err(error) => Err(azure_error(
                format!("failed to delete message {}", lease.message_id),
                error,
            )),
        }
    }

    /// Stores a dead letter for a message whose lease was just renewed, then deletes the
    /// message. When the delete finds the lease lost, deletes the dead letter again and
    /// returns false.
    pub(super) async fn move_to_dead_letters(&self, held: &Lease, reason: &str) -> Result<bool> {
        let id = dead_letter_id();
        let entity = self.dead_letter_entity(&id, held, reason).await?;
        table::insert(&self.dead_letters, &entity).await?;
        if !self.delete_message(held).await? {
            table::delete(&self.dead_letters, &self.queue_name, &id, None).await?;
            return Ok(false);
        }
        Ok(true)
    }

    async fn dead_letter_entity(&self, id: &str, lease: &Lease, reason: &str) -> Result<Entity> {
        let mut entity = Entity::new();
        let mut text = |name: &str, value: String| {
            entity.insert(name.to_owned(), Value::String(value));
        };
        text("PartitionKey", self.queue_name.clone());
        text("RowKey", id.to_owned());
        text("MessageId", lease.message_id.clone());
        text("Reason", truncate_chars(reason, MAX_PROPERTY_UTF16 / 2));
        let (task_id, resource_id) = QueueMessage::task_key_of(&lease.body);
        if let Some(task_id) = task_id {
            text("TaskId", task_id);
        }
        if let Some(resource_id) = resource_id {
            text("ResourceId", resource_id);
        }
        if lease.body.encode_utf16().count() <= MAX_PROPERTY_UTF16 {
            text("Body", lease.body.clone());
        } else {
            let name = format!("dead-letters/{}/{id}", self.queue_name);
            put_payload_blob(&self.blob_service, &name, lease.body.clone().into_bytes()).await?;
            text("BodyBlob", format!("{PAYLOAD_CONTAINER}/{name}"));
        }
        entity.insert("DequeueCount".to_owned(), Value::from(lease.dequeue_count));
        set_time(&mut entity, "DeadLetteredAt", &crate::record::now())?;
        Ok(entity)
    }

    async fn dead_letter_of(&self, entity: &Entity) -> Result<DeadLetter> {
        let body = match string(entity, "BodyBlob") {
            Some(reference) => read_reference(&self.blob_service, &reference).await?,
            None => string(entity, "Body").unwrap_or_default(),
        };
        let dead_lettered_at = string(entity, "DeadLetteredAt")
            .and_then(|text| crate::record::parse_time(&text).ok())
            .unwrap_or(DateTime::UNIX_EPOCH);
        Ok(DeadLetter {
            id: string(entity, "RowKey").unwrap_or_default(),
            body,
            reason: string(entity, "Reason").unwrap_or_default(),
            dequeue_count: integer(entity, "DequeueCount")
                .and_then(|count| u32::try_from(count).ok())
                .unwrap_or(0),
            dead_lettered_at,
            row_key: string(entity, "TaskId"),
            resource_id: string(entity, "ResourceId"),
        })
    }
}

/// Moves a task of a requeued dead letter back from the finished table to the active one
/// as CREATED, if it ended ERROR, so that it runs again.
async fn reopen_failed_task(
    shared: &Shared,
    resource_id: Option<&str>,
    task_id: &str,
) -> Result<()> {
    let Some((entity, _)) = find_task(&shared.finished, resource_id, task_id).await? else {
        return Ok(());
    };
    let mut record = shared.read_record(&shared.finished_name, entity).await?;
    if record.status != Status::Error {
        return Ok(());
    }
    record.status = Status::Created;
    record.end_time = None;
    record.error_message = None;
    let entity = shared.entity_of(&record, None).await?;
    table::upsert(&shared.active, &entity).await?;
    table::delete(
        &shared.finished,
        &record.partition_key,
        &record.row_key,
        None,
    )
    .await?;
    tracing::info!(
        task_id,
        "moved failed task back to the active table for its requeued message"
    );
    Ok(())
}

/// Returns true for the responses to a stale or unknown pop receipt: 404 when the message is
/// gone, 400 when the receipt does not match.
fn lease_lost(error: &azure_core::Error) -> bool {
    matches!(status_of(error), Some(400 | 404))
}

pub(super) fn fenced(written: bool) -> Fenced {
    match written {
        true => Fenced::Written,
        false => Fenced::LeaseLost,
    }
}

/// Size of a message text once XML-escaped in the request body.
///
/// NOTE: this counts the escaping of all five XML special characters, which may be more
/// than the service counts, so a message near the limit can be moved to a blob without
/// need; it is never less.
fn encoded_size(body: &str) -> usize {
    body.bytes()
        .map(|b| match b {
            b'&' => 5,
            b'<' | b'>' => 4,
            b'"' | b'\'' => 6,
            _ => 1,
        })
        .sum()
}

/// Rounds a duration up to whole seconds, the unit of Azure visibility timeouts.
fn whole_seconds(duration: Duration) -> Duration {
    Duration::from_secs(duration.as_millis().div_ceil(1000) as u64)
}

/// Returns an id that sorts newest first: the microseconds left until `i64::MAX`,
/// zero-padded, and a random suffix.
fn dead_letter_id() -> String {
    let micros = Utc::now().timestamp_micros();
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..8];
    format!("{:019}-{suffix}", i64::MAX - micros)
}

/// Checks that `id` has the form of [`dead_letter_id`]: 19 digits, a hyphen and 8
/// lower-case hexadecimal digits.
fn check_dead_letter_id(id: &str) -> Result<()> {
    let well_formed = id.split_once('-').is_some_and(|(time, suffix)| {
        let hex = |byte: u8| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte);
        time.len() == 19
            && time.bytes().all(|byte| byte.is_ascii_digit())
            && suffix.len() == 8
            && suffix.bytes().all(hex)
    });
    if well_formed {
        return Ok(());
    }
    Err(Error::Invalid(format!(
        "invalid dead letter id {}: on Azure it is 19 digits, a hyphen and 8 hexadecimal \
         digits, as `bgw dead-letters` lists it",
        crate::validate::quote(id)
    )))
}

fn truncate_chars(text: &str, max: usize) -> String {
    text.chars().take(max).collect()
}

fn chrono_time(time: time::OffsetDateTime) -> DateTime<Utc> {
    DateTime::from_timestamp(time.unix_timestamp(), time.nanosecond()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoded_size_counts_escapes() {
        assert_eq!(encoded_size("a&b"), 7);
        assert_eq!(encoded_size(r#"{"x": 1}"#), 18);
    }

    #[test]
    fn dead_letter_ids_sort_newest_first() {
        let older = dead_letter_id();
        std::thread::sleep(Duration::from_millis(2));
        let newer = dead_letter_id();
        assert!(newer < older, "{newer} should sort before {older}");
    }

    #[test]
    fn dead_letter_id_form_is_checked() {
        check_dead_letter_id(&dead_letter_id()).unwrap();
        check_dead_letter_id("9223370271066953806-0a1b2c3d").unwrap();
        for id in [
            "",
            "abc",
            "42",
            "9223370271066953806",
            "9223370271066953806-0a1b2c3",
            "9223370271066953806-0A1B2C3D",
            "922337027106695380x-0a1b2c3d",
            "9223370271066953806-0a1b2c3d-",
        ] {
            match check_dead_letter_id(id) {
                Err(Error::Invalid(message)) => {
                    assert!(message.contains("invalid dead letter id"), "{message}")
                }
                other => panic!("{id:?}: expected Error::Invalid, got {other:?}"),
            }
        }
    }

    #[test]
    fn finish_visibility_ignores_wall_clocks() {
        let far_past = DateTime::from_timestamp(0, 0).expect("the epoch is a valid time");
        let lease = Lease {
            message_id: "m".to_owned(),
            pop_receipt: "p".to_owned(),
            dequeue_count: 1,
            body: String::new(),
            inserted_at: far_past,
            visible_at: far_past,
            held_until: Instant::now() + Duration::from_secs(20),
        };
        let hidden = finish_visibility(&lease);
        assert!(hidden > Duration::from_secs(15), "{hidden:?}");
        assert!(hidden <= Duration::from_secs(20), "{hidden:?}");

        let expired = Lease {
            held_until: Instant::now(),
            ..lease
        };
        assert_eq!(finish_visibility(&expired), MIN_FINISH_VISIBILITY);
    }

    #[test]
    fn visibility_rounds_up_to_seconds() {
        assert_eq!(
            whole_seconds(Duration::from_millis(1)),
            Duration::from_secs(1)
        );
        assert_eq!(whole_seconds(Duration::ZERO), Duration::ZERO);
    }
}

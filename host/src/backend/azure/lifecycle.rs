//! Operations that span the task tables and the queue: a saga for submit, and writes
//! fenced by the lease and the entity's ETag for the rest.
//!
//! The fencing rule: a write under a lease first renews or releases the message, which
//! only the holder of the newest pop receipt can do. The entity write then carries the
//! ETag read just before (`If-Match`) and is redone from a fresh read when another writer
//! changed the entity in between. `LeaseMessageId` on the entity tells a record that a
//! delivery of another message (a duplicate) is running from one this lease may write, and
//! `LeaseDequeueCount` distinguishes a later delivery of the same message from an earlier
//! one.

use std::ops::Range;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::Utc;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::entity::{from_entity, integer, remove_property, set_lease, set_time, string, Entity};
use super::queue::finish_visibility;
use super::store::{conflict_error, find_task, insert_new_task, MAX_CONFLICT_RETRIES};
use super::table::{self, Write};
use super::{concurrently, AzureBackend, Shared};
use crate::backend::{
    AttemptStart, Backend, BlobStore, ComponentRegistry, Fenced, Finish, Lease, OutgoingMessage,
    Submitted,
};
use crate::record::{Status, TaskRecord};
use crate::{Error, Result};

/// Age after which an idempotency key whose task was never created may be claimed again:
/// the submit that claimed it has failed, because a submit takes seconds at most.
const STALE_CLAIM: chrono::TimeDelta = chrono::TimeDelta::seconds(60);

#[async_trait]
impl Backend for AzureBackend {
    fn store_mode(&self) -> &str {
        "azure"
    }

    fn table_names(&self) -> (&str, &str) {
        (&self.shared.active_name, &self.shared.finished_name)
    }

    /// Claims the idempotency key, puts the message hidden, inserts the record, then makes
    /// the message visible. When a step fails, the earlier ones are undone and the error
    /// is returned.
    ///
    /// The message goes first so that no failure leaves a record without a message. A
    /// message whose record was never stored, because both the insert and the delete that
    /// undoes the put failed, becomes visible after the submit visibility timeout and is
    /// dead-lettered by the daemon (see [`Backend::pending_record_window`]).
    async fn submit(&self, record: &TaskRecord, message: &OutgoingMessage) -> Result<Submitted> {
        let shared = self.ready().await?;
        if let Some(key) = &record.idempotency_key {
            if let Some(existing) = claim_idempotency_key(shared, key, record).await? {
                return Ok(existing);
            }
        }

        // A task delayed longer than the submit visibility timeout stays hidden for its
        // own delay, so its message needs no second update.
        let hidden_for = message.delay.max(shared.submit_visibility);
        let put_at = Instant::now();
        let put = match shared.put_hidden_message(&message.body, hidden_for).await {
            Ok(put) => put,
            Err(error) => {
                release_idempotency_key(shared, record).await;
                return Err(error);
            }
        };
        if let Err(error) = insert_new_task(shared, record).await {
            withdraw_message(shared, record, &put).await;
            release_idempotency_key(shared, record).await;
            return Err(error);
        }
        if message.delay < shared.submit_visibility {
            let delay_left = message.delay.saturating_sub(put_at.elapsed());
            reveal_message(shared, record, &put, delay_left).await;
        }
        Ok(Submitted::Created)
    }

    /// From the submit visibility timeout on, a message may be visible while its submit
    /// still stores the record, if the submit's table requests were slow. After the put,
    /// the submit makes two of them (a read of the finished table and the insert), so the
    /// window adds the retry time of each.
    ///
    /// NOTE: this bound is not strict. The SDK may start one more try after `max_retry`,
    /// and a try has no timeout. A submit that stores its record after the daemon
    /// dead-lettered the message finds its pop receipt stale and enqueues a replacement
    /// (see `reveal_message`).
    fn pending_record_window(&self) -> Option<Range<Duration>> {
        let start = self.shared.submit_visibility;
        Some(start..start + self.shared.max_retry * 2)
    }

    async fn begin_attempt(&self, lease: &Lease, start: &AttemptStart) -> Result<Fenced> {
        let shared = self.ready().await?;
        for _ in 0..MAX_CONFLICT_RETRIES {
            let Some((mut entity, etag)) =
                table::get(&shared.active, &start.resource_id, &start.task_id).await?
            else {
                return Err(Error::NotFound(format!(
                    "task {:?} of resource {:?} is not in table {}",
                    start.task_id, start.resource_id, shared.active_name
                )));
            };
            if !may_begin(&entity, lease) {
                return Ok(Fenced::LeaseLost);
            }
            mark_running(&mut entity, lease, start)?;
            match table::replace(&shared.active, &entity, Some(&etag)).await? {
                Write::Done(_) => return Ok(Fenced::Written),
                Write::Conflict => continue,
                Write::NotFound => {
                    return Err(Error::NotFound(format!(
                        "task {:?} left table {} while its attempt began",
                        start.task_id, shared.active_name
                    )))
                }
            }
        }
        Err(conflict_error(&start.task_id))
    }

    async fn begin_attempts(&self, items: &[(Lease, AttemptStart)]) -> Result<Vec<Result<Fenced>>> {
        let begins: Vec<_> = items
            .iter()
            .map(|(lease, start)| self.begin_attempt(lease, start))
            .collect();
        concurrently(begins)
            .await
            .into_iter()
            .map(|result| match result {
                Err(Error::NotFound(message)) => Ok(Err(Error::NotFound(message))),
                other => Ok(Ok(other?)),
            })
            .collect()
    }

    async fn finish(&self, finishes: &[Finish]) -> Result<Vec<Fenced>> {
        let shared = self.ready().await?;
        let writes: Vec<_> = finishes
            .iter()
            .map(|finish| finish_one(shared, finish))
            .collect();
        concurrently(writes).await.into_iter().collect()
    }

    async fn retry(&self, lease: &Lease, record: &TaskRecord, delay: Duration) -> Result<Fenced> {
        let shared = self.ready().await?;
        if shared.update_visibility(lease, delay).await?.is_none() {
            return Ok(Fenced::LeaseLost);
        }
        let mut record = record.clone();
        for _ in 0..MAX_CONFLICT_RETRIES {
            let found = table::get(&shared.active, &record.partition_key, &record.row_key).await?;
            let write = match found {
                // `bgw cancel` ended the CREATED task, for example one waiting for a
                // component, while this lease held its message. Writing the record back
                // would put the task in both tables. The message, already hidden for
                // `delay`, is acknowledged as a duplicate at its next delivery.
                None => return Ok(Fenced::Written),
                Some((current, etag)) => {
                    if runs_under_other_message(&current, lease) {
                        return Ok(Fenced::LeaseLost);
                    }
                    // A cancellation requested while the attempt ran must survive the retry.
                    record.cancel_requested |= from_entity(&current, &shared.active_name)
                        .is_ok_and(|current| current.cancel_requested);
                    let entity = shared.entity_of(&record, Some(lease)).await?;
                    table::replace(&shared.active, &entity, Some(&etag)).await?
                }
            };
            if write != Write::Conflict {
                return Ok(Fenced::Written);
            }
        }
        Err(conflict_error(&record.row_key))
    }

    async fn finish_without_lease(&self, record: &TaskRecord) -> Result<()> {
        let shared = self.ready().await?;
        let entity = shared.entity_of(record, None).await?;
        table::upsert(&shared.finished, &entity).await?;
        table::delete(&shared.active, &record.partition_key, &record.row_key, None).await?;
        Ok(())
    }

    /// Inserts the finished entity, which fails when one exists, then deletes the active
    /// entity if it is unchanged since it was read (`If-Match`). When another writer changed
    /// it in between, for example a daemon that began an attempt, the finished entity is
    /// deleted again, with its own ETag, and the task is read again.
    async fn end_unstarted(
        &self,
        resource_id: &str,
        task_id: &str,
        status: Status,
        error_message: &str,
    ) -> Result<bool> {
        let shared = self.ready().await?;
        for _ in 0..MAX_CONFLICT_RETRIES {
            let Some((entity, etag)) = table::get(&shared.active, resource_id, task_id).await?
            else {
                return Ok(false);
            };
            let mut record = shared.read_record(&shared.active_name, entity).await?;
            if record.status != Status::Created {
                return Ok(false);
            }
            record.status = status;
            record.error_message = Some(error_message.to_owned());
            record.set_end_time_now();
            let finished = shared.entity_of(&record, None).await?;
            let Write::Done(finished_etag) = table::insert(&shared.finished, &finished).await?
            else {
                // Another writer stored the task's outcome first.
                return Ok(false);
            };
            match table::delete(&shared.active, resource_id, task_id, Some(&etag)).await? {
                Write::Done(_) | Write::NotFound => return Ok(true),
                Write::Conflict => {
                    table::delete(&shared.finished, resource_id, task_id, Some(&finished_etag))
                        .await?;
                }
            }
        }
        Err(conflict_error(task_id))
    }

    fn blobs(&self) -> &dyn BlobStore {
        &self.blobs
    }

    fn registry(&self) -> &dyn ComponentRegistry {
        self
    }
}

/// Stores one terminal record: renews the message (proving the lease), writes the
/// finished entity, deletes the active one if unchanged since it was read, then deletes
/// the message with the renewed receipt, or moves it to the dead letters when the finish
/// gives a reason.
///
/// The finished entity is written before the active one is deleted, so a crash in between
/// leaves the task in both tables; its message then comes back, and the daemon sees the
/// finished record and acknowledges the message as a duplicate.
async fn finish_one(shared: &Shared, finish: &Finish) -> Result<Fenced> {
    let lease = &finish.lease;
    let record = &finish.record;
    let Some(held) = shared
        .update_visibility(lease, finish_visibility(lease))
        .await?
    else {
        return Ok(Fenced::LeaseLost);
    };
    let finished = shared.entity_of(record, Some(lease)).await?;

    let mut moved = false;
    for pass in 0..MAX_CONFLICT_RETRIES {
        let found = table::get(&shared.active, &record.partition_key, &record.row_key).await?;
        let etag = match found {
            Some((current, _)) if runs_under_other_message(&current, lease) => {
                return Ok(Fenced::LeaseLost)
            }
            Some((_, etag)) => Some(etag),
            // Gone before this finish wrote anything: `bgw cancel` ended the CREATED task
            // while this lease held its message, and the outcome stored first stays.
            None if pass == 0 && in_finished_table(shared, record).await? => {
                tracing::info!(
                    task_id = %record.row_key,
                    "task already ended while its message was leased: keeping its stored outcome"
                );
                shared.delete_message(&held).await?;
                return Ok(Fenced::Written);
            }
            None => None,
        };
        table::upsert(&shared.finished, &finished).await?;
        let Some(etag) = etag else {
            moved = true;
            break;
        };
        let deleted = table::delete(
            &shared.active,
            &record.partition_key,
            &record.row_key,
            Some(&etag),
        )
        .await?;
        if deleted != Write::Conflict {
            moved = true;
            break;
        }
    }
    if !moved {
        return Err(conflict_error(&record.row_key));
    }

    let removed = match &finish.dead_letter {
        Some(reason) => shared.move_to_dead_letters(&held, reason).await?,
        None => shared.delete_message(&held).await?,
    };
    if !removed {
        // The record is stored; the message comes back and is acknowledged as a duplicate.
        tracing::warn!(
            task_id = %record.row_key,
            message_id = %lease.message_id,
            "lease lost after the outcome was stored: the message will be acknowledged as a duplicate"
        );
    }
    Ok(Fenced::Written)
}

/// Returns true when the finished table has a record with the key of `record`.
async fn in_finished_table(shared: &Shared, record: &TaskRecord) -> Result<bool> {
    let found = table::get(&shared.finished, &record.partition_key, &record.row_key).await?;
    Ok(found.is_some())
}

/// Deletes the hidden message of a submit whose record was not stored. When the delete
/// fails too, the message becomes visible after the submit visibility timeout and names
/// a record that does not exist, so the daemon dead-letters it.
async fn withdraw_message(shared: &Shared, record: &TaskRecord, put: &Lease) {
    match shared.delete_message(put).await {
        Ok(true) => {}
        Ok(false) => tracing::warn!(
            task_id = %record.row_key,
            message_id = %put.message_id,
            "a daemon leased the message of a task whose record was not stored; it \
             dead-letters the message"
        ),
        Err(error) => tracing::error!(
            task_id = %record.row_key,
            message_id = %put.message_id,
            visible_at = %crate::record::format_time(&put.visible_at),
            %error,
            "failed to delete the message of a task whose record was not stored: the \
             daemon dead-letters the message once it is visible"
        ),
    }
}

/// Makes the message of a stored task visible after `delay`.
///
/// A failed update is only logged, because the message becomes visible by itself when
/// the submit visibility timeout ends. A stale pop receipt means that a daemon got the
/// message before the record was stored. The daemon released the message to look again
/// or, past the pending-record window, dead-lettered it, so a replacement is enqueued. A
/// duplicate delivery is acknowledged once the task has finished.
///
/// NOTE: updating a message with the pop receipt of its put was checked on Azurite 3.35
/// only. The service documents that receipt for Delete Message; if the real service
/// rejected it for Update Message, every submit would enqueue a replacement.
async fn reveal_message(shared: &Shared, record: &TaskRecord, put: &Lease, delay: Duration) {
    let error = match shared.update_visibility(put, delay).await {
        Ok(Some(_)) => return,
        Err(error) => error,
        Ok(None) => {
            tracing::warn!(
                task_id = %record.row_key,
                message_id = %put.message_id,
                "a daemon got the message before the record was stored: enqueueing a \
                 replacement"
            );
            let replacement = OutgoingMessage {
                body: put.body.clone(),
                delay,
            };
            match shared.put_message(&replacement).await {
                Ok(()) => return,
                Err(error) => error,
            }
        }
    };
    tracing::warn!(
        task_id = %record.row_key,
        message_id = %put.message_id,
        %error,
        "failed to make the message of a new task visible: the task starts when the \
         submit visibility timeout ends, unless a daemon dead-lettered the message \
         (see `bgw dead-letters`)"
    );
}

/// Returns whether a lease may begin an attempt on the task: no delivery of its own
/// message from this one on may have written the record, and no other message's delivery
/// may be running.
///
/// Attempt numbers do not follow the dequeue count, because deliveries that wait for a
/// component begin no attempt. So the entity keeps the dequeue count of the lease that last
/// wrote it. Entities written without it fall back to `Attempt`, which older versions set
/// to the dequeue count.
fn may_begin(entity: &Entity, lease: &Lease) -> bool {
    let written_by = integer(entity, "LeaseDequeueCount")
        .or_else(|| integer(entity, "Attempt"))
        .unwrap_or(0);
    let delivery = i64::from(lease.dequeue_count);
    let same_message = string(entity, "LeaseMessageId").as_deref() == Some(&lease.message_id);
    let running = string(entity, "Status").as_deref() == Some(Status::Running.as_str());
    match same_message {
        true => written_by < delivery,
        false => !running || written_by < delivery,
    }
}

/// Returns true when the task is RUNNING under a delivery of another message, which
/// happens only when the queue holds a duplicate message for the task.
fn runs_under_other_message(entity: &Entity, lease: &Lease) -> bool {
    let running = string(entity, "Status").as_deref() == Some(Status::Running.as_str());
    let owner = string(entity, "LeaseMessageId");
    running && owner.is_some_and(|owner| owner != lease.message_id)
}

/// Changes an entity read from the table to RUNNING for a new attempt, keeping every
/// property that the attempt does not change.
fn mark_running(entity: &mut Entity, lease: &Lease, start: &AttemptStart) -> Result<()> {
    let mut text = |name: &str, value: &str| {
        entity.insert(name.to_owned(), Value::String(value.to_owned()));
    };
    text("Status", Status::Running.as_str());
    text("ComponentDigest", &start.component_digest);
    text("HostId", &start.host_id);
    set_lease(entity, lease);
    entity.insert("Attempt".to_owned(), Value::from(start.attempt));
    entity.insert(
        "LeaseDequeueCount".to_owned(),
        Value::from(lease.dequeue_count),
    );
    entity.insert(
        "ComponentVersion".to_owned(),
        Value::from(start.component_version),
    );
    set_time(entity, "StartTime", &start.start_time)?;
    remove_property(entity, "EndTime");
    remove_property(entity, "ErrorMessage");
    remove_property(entity, "ComponentWaitStart");
    Ok(())
}

/// Claims an idempotency key for a new task. Returns the task that already has the key,
/// or `None` when this submit may create its task. Fails with
/// [`Error::IdempotencyConflict`] when that task was submitted with a different request.
///
/// NOTE: a key claimed less than a minute ago by a submit that has not stored its task
/// yet returns that task's id, even if that submit fails later.
async fn claim_idempotency_key(
    shared: &Shared,
    key: &str,
    record: &TaskRecord,
) -> Result<Option<Submitted>> {
    let entity = idempotency_entity(key, &shared.active_name, record)?;
    let partition_key = idempotency_partition(key);
    for _ in 0..MAX_CONFLICT_RETRIES {
        if let Write::Done(_) = table::insert(&shared.idempotency, &entity).await? {
            return Ok(None);
        }
        let Some((claim, etag)) =
            table::get(&shared.idempotency, &partition_key, &shared.active_name).await?
        else {
            continue;
        };
        let task_id = string(&claim, "TaskId").unwrap_or_default();
        let resource_id = string(&claim, "ResourceId").unwrap_or_default();
        let claimed_at = string(&claim, "ClaimedAt")
            .and_then(|text| crate::record::parse_time(&text).ok())
            .unwrap_or_default();

        let mut found = false;
        for (table, table_name) in shared.task_tables() {
            if let Some((entity, _)) = find_task(table, Some(&resource_id), &task_id).await? {
                let existing = shared.read_record(table_name, entity).await?;
                existing.check_same_request(record)?;
                found = true;
                break;
            }
        }
        // NOTE: `ClaimedAt` is on the claiming client's clock. With clocks more than
        // STALE_CLAIM apart, a fresh claim can look stale (two submits may then store a task
        // each) or a stale one fresh for longer.
        // NOTE: a claim whose task is not stored yet has no request to compare with, so a
        // different request with its key returns that task without an error.
        if found || Utc::now() - claimed_at < STALE_CLAIM {
            return Ok(Some(Submitted::Existing {
                task_id,
                resource_id,
            }));
        }
        // The submit that claimed the key failed before storing its task: take the key over.
        if let Write::Done(_) = table::replace(&shared.idempotency, &entity, Some(&etag)).await? {
            return Ok(None);
        }
    }
    Err(conflict_error(&record.row_key))
}

/// Deletes the claim of a submit that failed, if the record has a key.
async fn release_idempotency_key(shared: &Shared, record: &TaskRecord) {
    let Some(key) = &record.idempotency_key else {
        return;
    };
    let partition_key = idempotency_partition(key);
    let Ok(Some((claim, etag))) =
        table::get(&shared.idempotency, &partition_key, &shared.active_name).await
    else {
        return;
    };
    if string(&claim, "TaskId").as_deref() != Some(&record.row_key) {
        return;
    }
    let deleted = table::delete(
        &shared.idempotency,
        &partition_key,
        &shared.active_name,
        Some(&etag),
    )
    .await;
    if let Err(error) = deleted {
        tracing::warn!(task_id = %record.row_key, %error, "failed to release the idempotency key of a failed submit");
    }
}

/// Builds the claim of a key. Its partition key is the key's SHA-256 and its row key the
/// active table's name, so that deployments with other task tables in the same account
/// never see each other's keys.
fn idempotency_entity(key: &str, active_table: &str, record: &TaskRecord) -> Result<Entity> {
    let mut entity = Entity::new();
    let mut text = |name: &str, value: &str| {
        entity.insert(name.to_owned(), Value::String(value.to_owned()));
    };
    text("PartitionKey", &idempotency_partition(key));
    text("RowKey", active_table);
    text("TaskId", &record.row_key);
    text("ResourceId", &record.partition_key);
    set_time(&mut entity, "ClaimedAt", &crate::record::now())?;
    Ok(entity)
}

/// Partition key of an idempotency key: its SHA-256 in hex, because a key may contain
/// characters that Azure Table keys forbid.
fn idempotency_partition(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    fn lease(message_id: &str, dequeue_count: u32) -> Lease {
        let epoch = chrono::DateTime::from_timestamp(0, 0).expect("the epoch is a valid time");
        Lease {
            message_id: message_id.to_owned(),
            pop_receipt: "p".to_owned(),
            dequeue_count,
            body: String::new(),
            inserted_at: epoch,
            visible_at: epoch,
            held_until: Instant::now(),
        }
    }

    /// Builds the entity that `lease` wrote with `status` and `attempt`.
    fn written(status: Status, attempt: u32, lease: &Lease) -> Entity {
        let mut entity = Entity::new();
        entity.insert("Status".to_owned(), status.as_str().into());
        entity.insert("Attempt".to_owned(), Value::from(attempt));
        set_lease(&mut entity, lease);
        entity
    }

    #[test]
    fn may_begin_fences_earlier_deliveries() {
        // Deliveries 1 to 3 waited for a component, and delivery 4 began attempt 1.
        let running = written(Status::Running, 1, &lease("m", 4));
        assert!(!may_begin(&running, &lease("m", 3)), "a stale delivery");
        assert!(!may_begin(&running, &lease("m", 4)), "the same delivery");
        assert!(may_begin(&running, &lease("m", 5)), "after a lost attempt");

        let waited = written(Status::Created, 0, &lease("m", 3));
        assert!(may_begin(&waited, &lease("m", 4)), "after a wait");
    }

    #[test]
    fn may_begin_after_requeue() {
        // A requeued dead letter is a new message. Its first delivery ran attempt 4 of a task
        // that had used 3, and the attempt failed and is retried.
        let retried = written(Status::Created, 4, &lease("requeued", 1));
        assert!(may_begin(&retried, &lease("requeued", 2)));
    }

    #[test]
    fn may_begin_waits_for_other_message() {
        let running = written(Status::Running, 1, &lease("m", 1));
        assert!(!may_begin(&running, &lease("duplicate", 1)));

        let queued = written(Status::Created, 1, &lease("m", 1));
        assert!(may_begin(&queued, &lease("duplicate", 1)));
    }
}

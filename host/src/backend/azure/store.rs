//! The task tables: reading and writing [`TaskRecord`]s as entities.

use async_trait::async_trait;
use azure_core::Etag;
use azure_data_tables::prelude::TableClient;
use chrono::{DateTime, Utc};
use serde_json::Value;

use super::entity::{
    delete_payload_blobs, from_entity, load_long_values, to_entity, Entity, MAX_PROPERTY_UTF16,
};
use super::table::{self, equals, Write};
use super::{concurrently, AzureBackend, Shared};
use crate::backend::{CancelOutcome, Lease, ListFilter, ProgressUpdate, TaskStore};
use crate::record::{format_time, Status, TaskRecord};
use crate::{Error, Result};

/// Times a read-check-write loop starts over when another writer changed the entity
/// between the read and the conditional write.
pub(super) const MAX_CONFLICT_RETRIES: usize = 16;

#[async_trait]
impl TaskStore for AzureBackend {
    async fn insert_task(&self, record: &TaskRecord) -> Result<()> {
        let shared = self.ready().await?;
        insert_new_task(shared, record).await
    }

    async fn delete_task(&self, resource_id: &str, task_id: &str) -> Result<()> {
        let shared = self.ready().await?;
        table::delete(&shared.active, resource_id, task_id, None).await?;
        delete_payload_blobs(&shared.blob_service, task_id).await
    }

    async fn get_task(
        &self,
        resource_id: Option<&str>,
        task_id: &str,
    ) -> Result<Option<TaskRecord>> {
        let shared = self.ready().await?;
        for (client, name) in shared.task_tables() {
            if let Some((entity, _)) = find_task(client, resource_id, task_id).await? {
                return Ok(Some(shared.read_record(name, entity).await?));
            }
        }
        Ok(None)
    }

    async fn get_tasks(&self, keys: &[(String, String)]) -> Result<Vec<Option<TaskRecord>>> {
        let reads: Vec<_> = keys
            .iter()
            .map(|(resource_id, task_id)| self.get_task(Some(resource_id), task_id))
            .collect();
        concurrently(reads).await.into_iter().collect()
    }

    async fn list_tasks(&self, filter: &ListFilter) -> Result<Vec<TaskRecord>> {
        let shared = self.ready().await?;
        let mut conditions = Vec::new();
        if let Some(status) = filter.status {
            conditions.push(equals("Status", status.as_str()));
        }
        if let Some(task_type) = &filter.task_type {
            conditions.push(equals("TaskType", task_type));
        }
        if let Some(resource_id) = &filter.resource_id {
            conditions.push(equals("PartitionKey", resource_id));
        }
        let condition = (!conditions.is_empty()).then(|| conditions.join(" and "));

        // NOTE: Azure Tables cannot sort, so every matching entity of both tables is read
        // and sorted here; `limit` bounds the output, not the reads.
        let mut records = Vec::new();
        for (client, name) in shared.task_tables() {
            for (entity, _) in table::query(client, condition.clone()).await? {
                records.push(shared.read_record(name, entity).await?);
            }
        }
        records.sort_by(|a, b| (b.created_time, &b.row_key).cmp(&(a.created_time, &a.row_key)));
        if let Some(limit) = filter.limit {
            records.truncate(limit);
        }
        Ok(records)
    }

    /// Also deletes each pruned task's blobs in `bgw-payloads`, after its entity, so that a
    /// failure leaves unreferenced blobs behind, never an entity whose blobs are gone.
    async fn prune_finished(&self, before: DateTime<Utc>, limit: usize) -> Result<Vec<TaskRecord>> {
        let shared = self.ready().await?;
        // EndTime is an Edm.DateTime, written so by bgw and by the Python library.
        let filter = format!("EndTime lt datetime'{}'", format_time(&before));
        let mut pruned = Vec::new();
        for (entity, _) in table::query(&shared.finished, Some(filter)).await? {
            pruned.push(shared.read_record(&shared.finished_name, entity).await?);
        }
        pruned.sort_by_key(|record| record.end_time);
        pruned.truncate(limit);
        for record in &pruned {
            table::delete(
                &shared.finished,
                &record.partition_key,
                &record.row_key,
                None,
            )
            .await?;
            if let Err(error) = delete_payload_blobs(&shared.blob_service, &record.row_key).await {
                tracing::warn!(task_id = %record.row_key, error = %error, "pruned task left blobs");
            }
        }
        Ok(pruned)
    }

    async fn update_progress(&self, updates: &[ProgressUpdate]) -> Result<()> {
        let shared = self.ready().await?;
        for update in updates {
            let mut properties = Entity::new();
            properties.insert("Progress".to_owned(), Value::from(update.percent.min(100)));
            let message: String = truncate_utf16(&update.message, MAX_PROPERTY_UTF16);
            properties.insert("ProgressMessage".to_owned(), Value::String(message));
            // A task that finished meanwhile has no active entity; its progress is moot.
            table::merge(
                &shared.active,
                &update.resource_id,
                &update.task_id,
                &properties,
                None,
            )
            .await?;
        }
        Ok(())
    }

    async fn request_cancel(
        &self,
        resource_id: Option<&str>,
        task_id: &str,
    ) -> Result<CancelOutcome> {
        let shared = self.ready().await?;
        for _ in 0..MAX_CONFLICT_RETRIES {
            if let Some(outcome) = try_cancel(shared, resource_id, task_id).await? {
                return Ok(outcome);
            }
        }
        Err(conflict_error(task_id))
    }

    async fn cancel_requested(&self, resource_id: &str, task_id: &str) -> Result<bool> {
        let shared = self.ready().await?;
        let found = table::get(&shared.active, resource_id, task_id).await?;
        Ok(found.is_some_and(|(entity, _)| {
            entity
                .get("CancelRequested")
                .is_some_and(|value| value.as_bool() == Some(true) || value == "true")
        }))
    }
}

impl Shared {
    /// The active and the finished table with their names, in lookup order.
    pub(super) fn task_tables(&self) -> [(&TableClient, &str); 2] {
        [
            (&self.active, self.active_name.as_str()),
            (&self.finished, self.finished_name.as_str()),
        ]
    }

    /// Reads a record from an entity, loading the values stored as blobs.
    pub(super) async fn read_record(&self, table: &str, mut entity: Entity) -> Result<TaskRecord> {
        load_long_values(&self.blob_service, &mut entity).await?;
        from_entity(&entity, table)
    }

    /// Builds the entity of a record written under `lease`, if any.
    pub(super) async fn entity_of(
        &self,
        record: &TaskRecord,
        lease: Option<&Lease>,
    ) -> Result<Entity> {
        to_entity(&self.blob_service, record, lease).await
    }
}

/// Finds a task's entity: by key with a resource id, by a query on `RowKey` without one.
///
/// NOTE: the query without a resource id scans every partition of the table, so it gets
/// slower as the table grows; pass the resource id where it is known.
pub(super) async fn find_task(
    client: &TableClient,
    resource_id: Option<&str>,
    task_id: &str,
) -> Result<Option<(Entity, Etag)>> {
    match resource_id {
        Some(resource_id) => table::get(client, resource_id, task_id).await,
        None => Ok(table::query(client, Some(equals("RowKey", task_id)))
            .await?
            .into_iter()
            .next()),
    }
}

/// Inserts a record into the active table unless a task with its keys exists in either
/// table.
///
/// NOTE: unlike SQLite, the same task id under another resource id is not detected,
/// because that check would scan both tables on every submit; task ids are UUIDv7.
pub(super) async fn insert_new_task(shared: &Shared, record: &TaskRecord) -> Result<()> {
    let exists = || {
        Error::Invalid(format!(
            "task id {:?} already exists; every task needs a new id",
            record.row_key
        ))
    };
    if table::get(&shared.finished, &record.partition_key, &record.row_key)
        .await?
        .is_some()
    {
        return Err(exists());
    }
    let entity = shared.entity_of(record, None).await?;
    match table::insert(&shared.active, &entity).await? {
        Write::Done(_) => Ok(()),
        _ => Err(exists()),
    }
}

/// One pass of `request_cancel`. Returns `None` when another writer changed the entity
/// between the read and the write, so the caller starts over.
async fn try_cancel(
    shared: &Shared,
    resource_id: Option<&str>,
    task_id: &str,
) -> Result<Option<CancelOutcome>> {
    let Some((entity, etag)) = find_task(&shared.active, resource_id, task_id).await? else {
        return match find_task(&shared.finished, resource_id, task_id).await? {
            Some((entity, _)) => {
                let record = shared.read_record(&shared.finished_name, entity).await?;
                Ok(Some(CancelOutcome::AlreadyFinished(record.status)))
            }
            None => Ok(Some(CancelOutcome::NotFound)),
        };
    };
    let mut record = shared.read_record(&shared.active_name, entity).await?;
    let (partition_key, row_key) = (record.partition_key.clone(), record.row_key.clone());

    if record.status == Status::Running {
        let mut flag = Entity::new();
        flag.insert("CancelRequested".to_owned(), Value::Bool(true));
        return Ok(
            match table::merge(&shared.active, &partition_key, &row_key, &flag, Some(&etag)).await?
            {
                Write::Done(_) => Some(CancelOutcome::Requested),
                _ => None,
            },
        );
    }

    // Queued or waiting for a retry: it never starts again. Its message is acknowledged
    // as a duplicate delivery when it is next leased. The finished entity is written
    // first, so that a crash in between leaves the task in both tables, not in neither.
    record.cancel_unstarted();
    let finished = shared.entity_of(&record, None).await?;
    table::upsert(&shared.finished, &finished).await?;
    match table::delete(&shared.active, &partition_key, &row_key, Some(&etag)).await? {
        Write::Done(_) | Write::NotFound => Ok(Some(CancelOutcome::Cancelled)),
        Write::Conflict => {
            // The task changed (it may have started): undo and look again.
            table::delete(&shared.finished, &partition_key, &row_key, None).await?;
            Ok(None)
        }
    }
}

/// The error of a read-check-write loop that kept losing to other writers.
pub(super) fn conflict_error(task_id: &str) -> Error {
    Error::Other(anyhow::anyhow!(
        "task {task_id:?} was changed by other writers {MAX_CONFLICT_RETRIES} times in a row \
         while this write was being made; try again"
    ))
}

/// Cuts text to at most `max` UTF-16 code units, at a character boundary.
fn truncate_utf16(text: &str, max: usize) -> String {
    let mut units = 0;
    text.chars()
        .take_while(|ch| {
            units += ch.len_utf16();
            units <= max
        })
        .collect()
}

//! Small wrappers over the Tables client that turn the status codes the fencing relies on
//! (404, 409 and 412) into values.

use azure_core::Etag;
use azure_data_tables::prelude::{EntityClient, Filter, IfMatchCondition, TableClient};
use futures::StreamExt;
use serde_json::Value;

use super::entity::{strip_metadata, Entity};
use super::{azure_error, odata_quote, status_of};
use crate::Result;

/// Outcome of a conditional table write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Write {
    /// Stored; the entity's new ETag.
    Done(Etag),
    /// The entity does not exist.
    NotFound,
    /// The entity exists: an insert found it, or an `If-Match` write found another ETag.
    Conflict,
}

/// Returns the client of one entity. Keys are quoted for the OData key syntax.
pub(super) fn entity_client(
    table: &TableClient,
    partition_key: &str,
    row_key: &str,
) -> EntityClient {
    table
        .partition_key_client(odata_quote(partition_key))
        .entity_client(odata_quote(row_key))
}

/// Reads one entity and its ETag, or `None` when it does not exist.
pub(super) async fn get(
    table: &TableClient,
    partition_key: &str,
    row_key: &str,
) -> Result<Option<(Entity, Etag)>> {
    let response = entity_client(table, partition_key, row_key)
        .get::<Entity>()
        .await;
    match response {
        Ok(response) => {
            let mut entity = response.entity;
            strip_metadata(&mut entity);
            Ok(Some((entity, response.etag)))
        }
        Err(error) if status_of(&error) == Some(404) => Ok(None),
        Err(error) => Err(azure_error(
            format!(
                "failed to read entity ({partition_key:?}, {row_key:?}) of table {}",
                table.table_name()
            ),
            error,
        )),
    }
}

/// Returns every entity that matches an OData filter, with its ETag, across all pages.
/// A missing table reads as empty.
pub(super) async fn query(
    table: &TableClient,
    filter: Option<String>,
) -> Result<Vec<(Entity, Etag)>> {
    let mut builder = table.query();
    if let Some(filter) = filter {
        builder = builder.filter(Filter::new(filter));
    }
    let mut pages = builder.into_stream::<Entity>();
    let mut found = Vec::new();
    while let Some(page) = pages.next().await {
        let page = match page {
            Ok(page) => page,
            Err(error) if status_of(&error) == Some(404) => break,
            Err(error) => {
                return Err(azure_error(
                    format!("failed to query table {}", table.table_name()),
                    error,
                ))
            }
        };
        for mut entity in page.entities {
            let etag = strip_metadata(&mut entity).unwrap_or_default();
            found.push((entity, Etag::from(etag)));
        }
    }
    Ok(found)
}

/// Inserts an entity; [`Write::Conflict`] when one with the same keys exists.
pub(super) async fn insert(table: &TableClient, entity: &Entity) -> Result<Write> {
    let builder = table
        .insert::<_, Value>(entity)
        .map_err(|error| azure_error("failed to serialize an entity", error))?;
    match builder.await {
        Ok(response) => Ok(Write::Done(response.etag)),
        Err(error) if status_of(&error) == Some(409) => Ok(Write::Conflict),
        Err(error) => Err(azure_error(
            format!("failed to insert into table {}", table.table_name()),
            error,
        )),
    }
}

/// Replaces an entity if its ETag matches (`None` matches any); it must exist.
pub(super) async fn replace(
    table: &TableClient,
    entity: &Entity,
    if_match: Option<&Etag>,
) -> Result<Write> {
    let client = entity_client(table, key(entity, "PartitionKey"), key(entity, "RowKey"));
    let builder = client
        .update(entity, condition(if_match))
        .map_err(|error| azure_error("failed to serialize an entity", error))?;
    conditional(table, builder.await.map(|response| response.etag))
}

/// Merges properties into an entity if its ETag matches (`None` matches any).
pub(super) async fn merge(
    table: &TableClient,
    partition_key: &str,
    row_key: &str,
    properties: &Entity,
    if_match: Option<&Etag>,
) -> Result<Write> {
    let builder = entity_client(table, partition_key, row_key)
        .merge(properties, condition(if_match))
        .map_err(|error| azure_error("failed to serialize an entity", error))?;
    conditional(table, builder.await.map(|response| response.etag))
}

/// Inserts an entity or replaces the one with the same keys, whatever its ETag.
pub(super) async fn upsert(table: &TableClient, entity: &Entity) -> Result<()> {
    let client = entity_client(table, key(entity, "PartitionKey"), key(entity, "RowKey"));
    let builder = client
        .insert_or_replace(entity)
        .map_err(|error| azure_error("failed to serialize an entity", error))?;
    builder.await.map_err(|error| {
        azure_error(
            format!("failed to write to table {}", table.table_name()),
            error,
        )
    })?;
    Ok(())
}

/// Deletes an entity if its ETag matches (`None` matches any).
pub(super) async fn delete(
    table: &TableClient,
    partition_key: &str,
    row_key: &str,
    if_match: Option<&Etag>,
) -> Result<Write> {
    let result = entity_client(table, partition_key, row_key)
        .delete()
        .if_match(condition(if_match))
        .await;
    conditional(table, result.map(|_| Etag::from(String::new())))
}

fn condition(if_match: Option<&Etag>) -> IfMatchCondition {
    match if_match {
        Some(etag) => IfMatchCondition::Etag(etag.clone()),
        None => IfMatchCondition::Any,
    }
}

/// Maps the response of a conditional write: 404 is `NotFound`, 412 and 409 `Conflict`.
fn conditional(table: &TableClient, result: azure_core::Result<Etag>) -> Result<Write> {
    match result {
        Ok(etag) => Ok(Write::Done(etag)),
        Err(error) => match status_of(&error) {
            Some(404) => Ok(Write::NotFound),
            Some(409 | 412) => Ok(Write::Conflict),
            _ => Err(azure_error(
                format!("failed to write to table {}", table.table_name()),
                error,
            )),
        },
    }
}

fn key<'a>(entity: &'a Entity, name: &str) -> &'a str {
    entity.get(name).and_then(Value::as_str).unwrap_or_default()
}

/// Builds an OData filter `Name eq 'value'` with the value quoted.
pub(super) fn equals(name: &str, value: &str) -> String {
    format!("{name} eq '{}'", odata_quote(value))
}

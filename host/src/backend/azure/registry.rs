//! The component registry shared by every host of an account.
//!
//! The component table ([`COMPONENT_TABLE`] unless `BGW_COMPONENT_TABLE` names another):
//! one entity per version (PartitionKey the activity type,
//! RowKey the version zero-padded to ten digits), one `current` entity per activity type
//! naming its current version in `Version`, and the generation counter at (`_registry`,
//! `generation`). An unregistered type's `current` entity has no `Version`, and names the
//! version that was current until then in `UnregisteredVersion`.
//! No activity type starts with `_`, so the counter never collides with one. The `.wasm`
//! files are blobs `<digest>.wasm` in [`COMPONENT_CONTAINER`]. Each host caches them and
//! keeps its compiled artifacts in its local component folder, so it compiles a
//! component once.

use std::fs;
use std::io;
use std::path::PathBuf;

use async_trait::async_trait;
use chrono::Utc;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::entity::{integer, set_time, string, Entity};
use super::store::{conflict_error, MAX_CONFLICT_RETRIES};
use super::table::{self, equals, Write};
use super::{azure_error, status_of, AzureBackend, Shared, COMPONENT_CONTAINER};
use crate::backend::sqlite::registry::{
    already_unregistered, artifact_path, check_registration, not_registered, nothing_to_restore,
    validate_digest, validate_engine_hash, wasm_path, write_atomically,
};
use crate::backend::{ComponentRegistry, ComponentVersion, Limits, RetryPolicy};
use crate::record::parse_time;
use crate::{Error, Result};

const GENERATION_PARTITION: &str = "_registry";
const GENERATION_ROW: &str = "generation";
const CURRENT_ROW: &str = "current";

/// Property of an unregistered type's `current` entity: the version `rollback` restores.
const UNREGISTERED_VERSION: &str = "UnregisteredVersion";

#[async_trait]
impl ComponentRegistry for AzureBackend {
    async fn register(
        &self,
        activity_type: &str,
        digest: &str,
        wasm: &[u8],
        engine_hash: &str,
        artifact: &[u8],
        limits: Limits,
    ) -> Result<ComponentVersion> {
        check_registration(activity_type, digest, engine_hash, wasm)?;
        check_limits(&limits)?;
        let shared = self.ready().await?;

        // Files first, so that a stored version always has its files.
        let blob_name = format!("{digest}.wasm");
        shared
            .blob_service
            .container_client(COMPONENT_CONTAINER)
            .blob_client(&blob_name)
            .put_block_blob(wasm.to_vec())
            .await
            .map_err(|error| azure_error(format!("failed to upload {blob_name}"), error))?;
        let dir = shared.component_dir.clone();
        let (digest_owned, hash, wasm_bytes, artifact_bytes) = (
            digest.to_owned(),
            engine_hash.to_owned(),
            wasm.to_vec(),
            artifact.to_vec(),
        );
        blocking(move || {
            write_atomically(&wasm_path(&dir, &digest_owned), &wasm_bytes)?;
            write_atomically(&artifact_path(&dir, &digest_owned, &hash), &artifact_bytes)
        })
        .await?;

        let registered_at = crate::record::now();
        let version =
            insert_next_version(shared, activity_type, digest, &limits, &registered_at).await?;
        point_current_to(shared, activity_type, version, PointerMove::Forward).await?;
        bump_generation(shared).await?;
        Ok(ComponentVersion {
            activity_type: activity_type.to_owned(),
            version,
            digest: digest.to_owned(),
            limits,
            registered_at,
            current: true,
        })
    }

    async fn current(&self, activity_type: &str) -> Result<Option<ComponentVersion>> {
        let shared = self.ready().await?;
        let Some(current) = current_number(shared, activity_type).await? else {
            return Ok(None);
        };
        let found = table::get(&shared.components, activity_type, &row_key(current)).await?;
        found
            .map(|(entity, _)| version_of(&entity, Some(current)))
            .transpose()
    }

    async fn versions(&self, activity_type: Option<&str>) -> Result<Vec<ComponentVersion>> {
        let shared = self.ready().await?;
        let filter = activity_type.map(|activity_type| equals("PartitionKey", activity_type));
        let entities = table::query(&shared.components, filter).await?;

        let mut currents = std::collections::HashMap::new();
        for (entity, _) in &entities {
            if string(entity, "RowKey").as_deref() == Some(CURRENT_ROW) {
                let activity_type = string(entity, "PartitionKey").unwrap_or_default();
                currents.insert(activity_type, integer(entity, "Version").unwrap_or(0));
            }
        }
        let mut versions = Vec::new();
        for (entity, _) in &entities {
            let partition = string(entity, "PartitionKey").unwrap_or_default();
            let row = string(entity, "RowKey").unwrap_or_default();
            if partition == GENERATION_PARTITION || row == CURRENT_ROW {
                continue;
            }
            let current = currents.get(&partition).map(|&version| version as u32);
            versions.push(version_of(entity, current)?);
        }
        versions.sort_by(|a, b| {
            (a.registered_at, &a.activity_type, a.version).cmp(&(
                b.registered_at,
                &b.activity_type,
                b.version,
            ))
        });
        Ok(versions)
    }

    async fn rollback(&self, activity_type: &str) -> Result<ComponentVersion> {
        let shared = self.ready().await?;
        let Some(current) = current_number(shared, activity_type).await? else {
            return self.restore_unregistered(shared, activity_type).await;
        };
        let numbers: Vec<u32> = self
            .versions(Some(activity_type))
            .await?
            .iter()
            .map(|version| version.version)
            .collect();
        let Some(previous) = numbers.iter().copied().filter(|&v| v < current).max() else {
            let message = match numbers.len() {
                1 => format!(
                    "activity type {activity_type:?} has only version {current}, so there is no \
                     earlier version to roll back to"
                ),
                _ => format!(
                    "activity type {activity_type:?} is at its first version {current}, so there \
                     is no earlier version to roll back to; register a new version instead"
                ),
            };
            return Err(Error::Invalid(message));
        };
        point_current_to(shared, activity_type, previous, PointerMove::Back(current)).await?;
        bump_generation(shared).await?;
        self.current(activity_type).await?.ok_or_else(|| {
            Error::Other(anyhow::anyhow!(
                "version {previous} of activity type {activity_type:?} vanished during rollback"
            ))
        })
    }

    async fn unregister(&self, activity_type: &str) -> Result<ComponentVersion> {
        let shared = self.ready().await?;
        for _ in 0..MAX_CONFLICT_RETRIES {
            let found = table::get(&shared.components, activity_type, CURRENT_ROW).await?;
            let current = found
                .as_ref()
                .and_then(|(entity, _)| pointer_version(entity));
            let (Some((_, etag)), Some(current)) = (found, current) else {
                return Err(match self.versions(Some(activity_type)).await?.is_empty() {
                    true => not_registered(activity_type),
                    false => already_unregistered(activity_type),
                });
            };
            let mut pointer = pointer_entity(activity_type);
            pointer.insert(UNREGISTERED_VERSION.to_owned(), Value::from(current));
            if let Write::Done(_) =
                table::replace(&shared.components, &pointer, Some(&etag)).await?
            {
                bump_generation(shared).await?;
                return self.version(shared, activity_type, current).await;
            }
        }
        Err(conflict_error(activity_type))
    }

    async fn generation(&self) -> Result<u64> {
        let shared = self.ready().await?;
        let found = table::get(&shared.components, GENERATION_PARTITION, GENERATION_ROW).await?;
        Ok(found
            .and_then(|(entity, _)| integer(&entity, "Generation"))
            .map_or(0, |value| value.max(0) as u64))
    }

    async fn load_wasm(&self, digest: &str) -> Result<Vec<u8>> {
        validate_digest(digest)?;
        let shared = self.ready().await?;
        let path = wasm_path(&shared.component_dir, digest);
        let cached = path.clone();
        if let Some(bytes) = blocking(move || Ok(fs::read(&cached).ok())).await? {
            return Ok(bytes);
        }

        let blob_name = format!("{digest}.wasm");
        let bytes = shared
            .blob_service
            .container_client(COMPONENT_CONTAINER)
            .blob_client(&blob_name)
            .get_content()
            .await
            .map_err(|error| match status_of(&error) {
                Some(404) => Error::NotFound(format!(
                    "no .wasm file for component digest {digest} in container \
                     {COMPONENT_CONTAINER}"
                )),
                _ => azure_error(format!("failed to download {blob_name}"), error),
            })?;
        let actual = hex::encode(Sha256::digest(&bytes));
        if actual != digest {
            return Err(Error::Invalid(format!(
                "blob {blob_name} in container {COMPONENT_CONTAINER} has SHA-256 {actual}, \
                 not its name's digest"
            )));
        }
        let copy = bytes.clone();
        blocking(move || write_atomically(&path, &copy)).await?;
        Ok(bytes)
    }

    async fn artifact_path(&self, digest: &str, engine_hash: &str) -> Result<Option<PathBuf>> {
        validate_digest(digest)?;
        validate_engine_hash(engine_hash)?;
        let path = artifact_path(&self.shared.component_dir, digest, engine_hash);
        blocking(move || Ok(path.is_file().then_some(path))).await
    }

    async fn store_artifact(
        &self,
        digest: &str,
        engine_hash: &str,
        artifact: &[u8],
    ) -> Result<PathBuf> {
        validate_digest(digest)?;
        validate_engine_hash(engine_hash)?;
        let path = artifact_path(&self.shared.component_dir, digest, engine_hash);
        let artifact = artifact.to_vec();
        blocking(move || {
            write_atomically(&path, &artifact)?;
            Ok(path)
        })
        .await
    }
}

impl AzureBackend {
    /// Makes the version current again that was current when the type was unregistered.
    async fn restore_unregistered(
        &self,
        shared: &Shared,
        activity_type: &str,
    ) -> Result<ComponentVersion> {
        for _ in 0..MAX_CONFLICT_RETRIES {
            let found = table::get(&shared.components, activity_type, CURRENT_ROW).await?;
            let remembered = found.as_ref().and_then(|(entity, _)| {
                let version = integer(entity, UNREGISTERED_VERSION)?;
                u32::try_from(version).ok()
            });
            let (Some((entity, etag)), Some(version)) = (found, remembered) else {
                return Err(match self.versions(Some(activity_type)).await?.is_empty() {
                    true => not_registered(activity_type),
                    false => nothing_to_restore(activity_type),
                });
            };
            if pointer_version(&entity).is_some() {
                return Err(Error::Invalid(format!(
                    "activity type {activity_type:?} was registered again during the rollback; \
                     list the versions and try again"
                )));
            }
            let mut pointer = pointer_entity(activity_type);
            pointer.insert("Version".to_owned(), Value::from(version));
            if let Write::Done(_) =
                table::replace(&shared.components, &pointer, Some(&etag)).await?
            {
                bump_generation(shared).await?;
                let mut restored = self.version(shared, activity_type, version).await?;
                restored.current = true;
                return Ok(restored);
            }
        }
        Err(conflict_error(activity_type))
    }

    /// Reads one version from the registry table, with `current` false.
    async fn version(
        &self,
        shared: &Shared,
        activity_type: &str,
        version: u32,
    ) -> Result<ComponentVersion> {
        let found = table::get(&shared.components, activity_type, &row_key(version)).await?;
        let Some((entity, _)) = found else {
            return Err(Error::NotFound(format!(
                "version {version} of activity type {activity_type:?} is missing from the \
                 registry table"
            )));
        };
        version_of(&entity, None)
    }
}

/// Direction in which `point_current_to` may move the current version.
#[derive(Clone, Copy)]
enum PointerMove {
    /// To a newly registered version: only forward, so that of two registrations racing
    /// the higher version wins.
    Forward,
    /// Back from the given version; fails if another host moved the pointer meanwhile.
    Back(u32),
}

/// Inserts the next version entity of an activity type, retrying with the next number
/// when another host took this one.
async fn insert_next_version(
    shared: &Shared,
    activity_type: &str,
    digest: &str,
    limits: &Limits,
    registered_at: &chrono::DateTime<Utc>,
) -> Result<u32> {
    let filter = equals("PartitionKey", activity_type);
    let highest = table::query(&shared.components, Some(filter))
        .await?
        .iter()
        .filter_map(|(entity, _)| string(entity, "RowKey")?.parse::<u32>().ok())
        .max()
        .unwrap_or(0);
    for version in (highest + 1)..=(highest + MAX_CONFLICT_RETRIES as u32) {
        let entity = version_entity(activity_type, version, digest, limits, registered_at)?;
        if let Write::Done(_) = table::insert(&shared.components, &entity).await? {
            return Ok(version);
        }
    }
    Err(conflict_error(activity_type))
}

async fn point_current_to(
    shared: &Shared,
    activity_type: &str,
    version: u32,
    direction: PointerMove,
) -> Result<()> {
    let mut pointer = pointer_entity(activity_type);
    pointer.insert("Version".to_owned(), Value::from(version));

    for _ in 0..MAX_CONFLICT_RETRIES {
        let found = table::get(&shared.components, activity_type, CURRENT_ROW).await?;
        let write = match (found, direction) {
            (None, _) => table::insert(&shared.components, &pointer).await?,
            (Some((entity, etag)), PointerMove::Forward) => {
                if integer(&entity, "Version").unwrap_or(0) >= i64::from(version) {
                    return Ok(());
                }
                table::replace(&shared.components, &pointer, Some(&etag)).await?
            }
            (Some((entity, etag)), PointerMove::Back(from)) => {
                if integer(&entity, "Version") != Some(i64::from(from)) {
                    return Err(Error::Invalid(format!(
                        "the current version of activity type {activity_type:?} changed during \
                         the rollback; list the versions and try again"
                    )));
                }
                table::replace(&shared.components, &pointer, Some(&etag)).await?
            }
        };
        if let Write::Done(_) = write {
            return Ok(());
        }
    }
    Err(conflict_error(activity_type))
}

async fn current_number(shared: &Shared, activity_type: &str) -> Result<Option<u32>> {
    let found = table::get(&shared.components, activity_type, CURRENT_ROW).await?;
    Ok(found.and_then(|(entity, _)| pointer_version(&entity)))
}

/// Returns the version a `current` entity names, or `None` for an unregistered type.
fn pointer_version(pointer: &Entity) -> Option<u32> {
    integer(pointer, "Version").and_then(|version| u32::try_from(version).ok())
}

/// Returns a `current` entity of an activity type without its properties.
fn pointer_entity(activity_type: &str) -> Entity {
    let mut pointer = Entity::new();
    pointer.insert("PartitionKey".to_owned(), activity_type.into());
    pointer.insert("RowKey".to_owned(), CURRENT_ROW.into());
    pointer
}

async fn bump_generation(shared: &Shared) -> Result<()> {
    for _ in 0..MAX_CONFLICT_RETRIES {
        let found = table::get(&shared.components, GENERATION_PARTITION, GENERATION_ROW).await?;
        let (next, etag) = match found {
            Some((entity, etag)) => (integer(&entity, "Generation").unwrap_or(0) + 1, Some(etag)),
            None => (1, None),
        };
        let mut entity = Entity::new();
        entity.insert("PartitionKey".to_owned(), GENERATION_PARTITION.into());
        entity.insert("RowKey".to_owned(), GENERATION_ROW.into());
        entity.insert("Generation".to_owned(), Value::String(next.to_string()));
        entity.insert("Generation@odata.type".to_owned(), "Edm.Int64".into());
        let write = match etag {
            Some(etag) => table::replace(&shared.components, &entity, Some(&etag)).await?,
            None => table::insert(&shared.components, &entity).await?,
        };
        if let Write::Done(_) = write {
            return Ok(());
        }
    }
    Err(conflict_error("registry generation"))
}

fn version_entity(
    activity_type: &str,
    version: u32,
    digest: &str,
    limits: &Limits,
    registered_at: &chrono::DateTime<Utc>,
) -> Result<Entity> {
    let mut entity = Entity::new();
    entity.insert("PartitionKey".to_owned(), activity_type.into());
    entity.insert("RowKey".to_owned(), row_key(version).into());
    entity.insert("Digest".to_owned(), digest.into());
    let int64 = [
        ("Fuel", limits.fuel),
        ("MemoryMib", limits.memory_mib),
        ("TimeoutSecs", limits.timeout_secs),
        ("MaxOutputBytes", limits.max_output_bytes),
        ("BackoffMs", limits.retry.backoff_ms),
        ("MaxBackoffMs", limits.retry.max_backoff_ms),
    ];
    for (name, value) in int64 {
        entity.insert(name.to_owned(), Value::String(value.to_string()));
        entity.insert(format!("{name}@odata.type"), "Edm.Int64".into());
    }
    entity.insert(
        "MaxAttempts".to_owned(),
        Value::from(limits.retry.max_attempts),
    );
    set_time(&mut entity, "RegisteredAt", registered_at)?;
    Ok(entity)
}

fn version_of(entity: &Entity, current: Option<u32>) -> Result<ComponentVersion> {
    let activity_type = string(entity, "PartitionKey").unwrap_or_default();
    let version = string(entity, "RowKey")
        .and_then(|row| row.parse::<u32>().ok())
        .unwrap_or(0);
    let registered_at = string(entity, "RegisteredAt")
        .ok_or_else(|| "missing".to_owned())
        .and_then(|text| parse_time(&text))
        .map_err(|error| {
            Error::Invalid(format!(
                "version {version} of activity type {activity_type:?} has an invalid \
                 registration time: {error}"
            ))
        })?;
    let limit = |name: &str| integer(entity, name).map_or(0, |value| value.max(0) as u64);
    Ok(ComponentVersion {
        limits: Limits {
            fuel: limit("Fuel"),
            memory_mib: limit("MemoryMib"),
            timeout_secs: limit("TimeoutSecs"),
            max_output_bytes: limit("MaxOutputBytes"),
            retry: RetryPolicy {
                max_attempts: integer(entity, "MaxAttempts")
                    .map_or(1, |value| value.clamp(1, i64::from(u32::MAX)) as u32),
                backoff_ms: limit("BackoffMs"),
                max_backoff_ms: limit("MaxBackoffMs"),
            },
        },
        digest: string(entity, "Digest").unwrap_or_default(),
        registered_at,
        current: current == Some(version),
        activity_type,
        version,
    })
}

/// Row key of a version: zero-padded, so that row keys sort in version order.
fn row_key(version: u32) -> String {
    format!("{version:010}")
}

/// Rejects limits above `i64::MAX`, the largest `Edm.Int64`.
fn check_limits(limits: &Limits) -> Result<()> {
    let fields = [
        ("fuel", limits.fuel),
        ("memory_mib", limits.memory_mib),
        ("timeout_secs", limits.timeout_secs),
        ("max_output_bytes", limits.max_output_bytes),
        ("backoff_ms", limits.retry.backoff_ms),
        ("max_backoff_ms", limits.retry.max_backoff_ms),
    ];
    for (name, value) in fields {
        if i64::try_from(value).is_err() {
            return Err(Error::Invalid(format!(
                "limit {name} = {value} is larger than the maximum {}",
                i64::MAX
            )));
        }
    }
    Ok(())
}

/// Runs file I/O on tokio's blocking thread pool, so that it never stalls an async worker.
async fn blocking<T, F>(op: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    match tokio::task::spawn_blocking(op).await {
        Ok(result) => result,
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        Err(error) => Err(Error::io(
            "file operation was cancelled",
            io::Error::other(error.to_string()),
        )),
    }
}

//! The component registry: versions per activity type in `bgw_components`, files in the
//! component folder.
//!
//! Files are named by content: `<digest>.wasm` and `<digest>-<engine hash>.cwasm`. Each is
//! written to a temporary file and renamed into place before the version row is committed,
//! so a committed version always has its files.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, Row};
use sha2::{Digest, Sha256};

use super::SqliteBackend;
use crate::backend::{ComponentRegistry, ComponentVersion, Limits, RetryPolicy};
use crate::record::{format_time, parse_time};
use crate::{validate, Error, Result};

/// Key of the registry generation counter in `bgw_meta`.
const GENERATION_KEY: &str = "registry_generation";

/// Prefix of the `bgw_meta` key that stores, for an unregistered activity type, the version
/// that was current until then, so that `rollback` can make it current again.
const UNREGISTERED_KEY_PREFIX: &str = "unregistered_version:";

const VERSION_COLUMNS: &str = "activity_type, version, digest, fuel, memory_mib, \
    timeout_secs, max_output_bytes, registered_at, current, max_attempts, backoff_ms, \
    max_backoff_ms";

#[async_trait]
impl ComponentRegistry for SqliteBackend {
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
        let limit_values = limit_values(&limits)?;
        let retry_values = [limits.retry.backoff_ms, limits.retry.max_backoff_ms]
            .map(|value| i64::try_from(value).unwrap_or(i64::MAX));

        let activity_type = activity_type.to_owned();
        let (digest, engine_hash) = (digest.to_owned(), engine_hash.to_owned());
        let (wasm, artifact) = (wasm.to_vec(), artifact.to_vec());
        let files_digest = digest.clone();
        self.run(move |shared| {
            let dir = &shared.component_dir;
            let wasm_path = wasm_path(dir, &files_digest);
            if !wasm_path.is_file() {
                write_atomically(&wasm_path, &wasm)?;
            }
            write_atomically(&artifact_path(dir, &files_digest, &engine_hash), &artifact)
        })
        .await?;

        let registered_at = crate::record::now();
        self.write(move |_, connection| {
            let version: u32 = connection
                .prepare_cached(
                    "SELECT coalesce(max(version), 0) + 1 FROM bgw_components
                     WHERE activity_type = ?1",
                )?
                .query_row([&activity_type], |row| row.get(0))?;
            connection
                .prepare_cached(
                    "UPDATE bgw_components SET current = 0
                     WHERE activity_type = ?1 AND current = 1",
                )?
                .execute([&activity_type])?;
            forget_unregistered_version(connection, &activity_type)?;
            let [fuel, memory_mib, timeout_secs, max_output_bytes] = limit_values;
            connection
                .prepare_cached(&format!(
                    "INSERT INTO bgw_components ({VERSION_COLUMNS})
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 1, ?9, ?10, ?11)"
                ))?
                .execute(rusqlite::params![
                    activity_type,
                    version,
                    digest,
                    fuel,
                    memory_mib,
                    timeout_secs,
                    max_output_bytes,
                    format_time(&registered_at),
                    limits.retry.max_attempts,
                    retry_values[0],
                    retry_values[1],
                ])?;
            bump_generation(connection)?;
            Ok(ComponentVersion {
                activity_type: activity_type.clone(),
                version,
                digest: digest.clone(),
                limits,
                registered_at,
                current: true,
            })
        })
        .await
    }

    async fn current(&self, activity_type: &str) -> Result<Option<ComponentVersion>> {
        let activity_type = activity_type.to_owned();
        self.run(move |shared| {
            shared
                .db
                .read(|connection| current_version(connection, &activity_type))
        })
        .await
    }

    async fn versions(&self, activity_type: Option<&str>) -> Result<Vec<ComponentVersion>> {
        let activity_type = activity_type.map(str::to_owned);
        self.run(move |shared| {
            shared.db.read(|connection| {
                let mut statement = connection.prepare_cached(&format!(
                    "SELECT {VERSION_COLUMNS} FROM bgw_components
                     WHERE ?1 IS NULL OR activity_type = ?1 ORDER BY rowid"
                ))?;
                let mut rows = statement.query([&activity_type])?;
                let mut versions = Vec::new();
                while let Some(row) = rows.next()? {
                    versions.push(version_from_row(row)?);
                }
                Ok(versions)
            })
        })
        .await
    }

    async fn rollback(&self, activity_type: &str) -> Result<ComponentVersion> {
        let activity_type = activity_type.to_owned();
        self.write(move |_, connection| rollback(connection, &activity_type))
            .await
    }

    async fn unregister(&self, activity_type: &str) -> Result<ComponentVersion> {
        let activity_type = activity_type.to_owned();
        self.write(move |_, connection| unregister(connection, &activity_type))
            .await
    }

    async fn generation(&self) -> Result<u64> {
        self.run(move |shared| {
            shared.db.read(|connection| {
                let value: Option<i64> = connection
                    .prepare_cached("SELECT value FROM bgw_meta WHERE key = ?1")?
                    .query_row([GENERATION_KEY], |row| row.get(0))
                    .optional()?;
                Ok(value.unwrap_or(0) as u64)
            })
        })
        .await
    }

    async fn load_wasm(&self, digest: &str) -> Result<Vec<u8>> {
        validate_digest(digest)?;
        let digest = digest.to_owned();
        self.run(move |shared| {
            let path = wasm_path(&shared.component_dir, &digest);
            fs::read(&path).map_err(|error| match error.kind() {
                io::ErrorKind::NotFound => Error::NotFound(format!(
                    "no .wasm file for component digest {digest} at {}",
                    path.display()
                )),
                _ => Error::io(format!("failed to read {}", path.display()), error),
            })
        })
        .await
    }

    async fn artifact_path(&self, digest: &str, engine_hash: &str) -> Result<Option<PathBuf>> {
        validate_digest(digest)?;
        validate_engine_hash(engine_hash)?;
        let path = artifact_path(&self.shared.component_dir, digest, engine_hash);
        self.run(move |_| Ok(path.is_file().then_some(path))).await
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
        self.run(move |_| {
            write_atomically(&path, &artifact)?;
            Ok(path)
        })
        .await
    }
}

fn current_version(
    connection: &Connection,
    activity_type: &str,
) -> Result<Option<ComponentVersion>> {
    let mut statement = connection.prepare_cached(&format!(
        "SELECT {VERSION_COLUMNS} FROM bgw_components WHERE activity_type = ?1 AND current = 1"
    ))?;
    let mut rows = statement.query([activity_type])?;
    match rows.next()? {
        Some(row) => Ok(Some(version_from_row(row)?)),
        None => Ok(None),
    }
}

/// Makes the highest version below the current one current, or, for an unregistered type,
/// the version that was current until it was unregistered.
fn rollback(connection: &Connection, activity_type: &str) -> Result<ComponentVersion> {
    let Some(current) = current_version(connection, activity_type)? else {
        return restore_unregistered(connection, activity_type);
    };
    let (previous, count): (Option<u32>, u32) = connection
        .prepare_cached(
            "SELECT max(CASE WHEN version < ?2 THEN version END), count(*)
             FROM bgw_components WHERE activity_type = ?1",
        )?
        .query_row(rusqlite::params![activity_type, current.version], |row| {
            Ok((row.get(0)?, row.get(1)?))
        })?;
    let Some(previous) = previous else {
        let message = match count {
            1 => format!(
                "activity type {activity_type:?} has only version {}, so there is no earlier \
                 version to roll back to",
                current.version
            ),
            _ => format!(
                "activity type {activity_type:?} is at its first version {}, so there is no \
                 earlier version to roll back to; register a new version instead",
                current.version
            ),
        };
        return Err(Error::Invalid(message));
    };

    connection
        .prepare_cached(
            "UPDATE bgw_components SET current = (version = ?2) WHERE activity_type = ?1",
        )?
        .execute(rusqlite::params![activity_type, previous])?;
    bump_generation(connection)?;
    current_version(connection, activity_type)?.ok_or_else(|| {
        Error::Other(anyhow::anyhow!(
            "version {previous} of activity type {activity_type:?} vanished during rollback"
        ))
    })
}

/// Clears the current version of a type and remembers it for `rollback`.
fn unregister(connection: &Connection, activity_type: &str) -> Result<ComponentVersion> {
    let Some(current) = current_version(connection, activity_type)? else {
        return Err(match version_count(connection, activity_type)? {
            0 => not_registered(activity_type),
            _ => already_unregistered(activity_type),
        });
    };
    connection
        .prepare_cached("UPDATE bgw_components SET current = 0 WHERE activity_type = ?1")?
        .execute([activity_type])?;
    connection
        .prepare_cached(
            "INSERT INTO bgw_meta (key, value) VALUES (?1, ?2)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )?
        .execute(rusqlite::params![
            unregistered_key(activity_type),
            current.version
        ])?;
    bump_generation(connection)?;
    Ok(ComponentVersion {
        current: false,
        ..current
    })
}

/// Makes the version current again that was current when the type was unregistered.
fn restore_unregistered(connection: &Connection, activity_type: &str) -> Result<ComponentVersion> {
    let key = unregistered_key(activity_type);
    let remembered: Option<u32> = connection
        .prepare_cached("SELECT value FROM bgw_meta WHERE key = ?1")?
        .query_row([&key], |row| row.get(0))
        .optional()?;
    let Some(version) = remembered else {
        return Err(match version_count(connection, activity_type)? {
            0 => not_registered(activity_type),
            _ => nothing_to_restore(activity_type),
        });
    };
    connection
        .prepare_cached(
            "UPDATE bgw_components SET current = (version = ?2) WHERE activity_type = ?1",
        )?
        .execute(rusqlite::params![activity_type, version])?;
    forget_unregistered_version(connection, activity_type)?;
    bump_generation(connection)?;
    match current_version(connection, activity_type)? {
        Some(restored) => Ok(restored),
        None => Err(Error::NotFound(format!(
            "version {version} of activity type {activity_type:?}, current when the type was \
             unregistered, no longer exists; register a new version"
        ))),
    }
}

fn forget_unregistered_version(connection: &Connection, activity_type: &str) -> Result<()> {
    connection
        .prepare_cached("DELETE FROM bgw_meta WHERE key = ?1")?
        .execute([unregistered_key(activity_type)])?;
    Ok(())
}

fn unregistered_key(activity_type: &str) -> String {
    format!("{UNREGISTERED_KEY_PREFIX}{activity_type}")
}

fn version_count(connection: &Connection, activity_type: &str) -> Result<u32> {
    Ok(connection
        .prepare_cached("SELECT count(*) FROM bgw_components WHERE activity_type = ?1")?
        .query_row([activity_type], |row| row.get(0))?)
}

/// The error of `unregister` or `rollback` on an activity type that has no version.
pub(in crate::backend) fn not_registered(activity_type: &str) -> Error {
    Error::NotFound(format!(
        "activity type {activity_type:?} is not registered: `bgw activities` lists the \
         registered ones"
    ))
}

/// The error of `unregister` on an activity type that has versions but no current one.
pub(in crate::backend) fn already_unregistered(activity_type: &str) -> Error {
    Error::Invalid(format!(
        "activity type {activity_type:?} is already unregistered: none of its versions is \
         current; `bgw rollback {activity_type}` makes the last current one current again"
    ))
}

/// The error of `rollback` on an activity type that has versions but no current one and
/// no version remembered by `unregister`.
pub(in crate::backend) fn nothing_to_restore(activity_type: &str) -> Error {
    Error::Invalid(format!(
        "activity type {activity_type:?} has no current version to roll back from: register \
         one with `bgw register {activity_type} FILE.wasm`"
    ))
}

fn bump_generation(connection: &Connection) -> Result<()> {
    connection
        .prepare_cached(
            "INSERT INTO bgw_meta (key, value) VALUES (?1, 1)
             ON CONFLICT (key) DO UPDATE SET value = value + 1",
        )?
        .execute([GENERATION_KEY])?;
    Ok(())
}

fn version_from_row(row: &Row<'_>) -> Result<ComponentVersion> {
    let activity_type: String = row.get(0)?;
    let version: u32 = row.get(1)?;
    let registered_at: String = row.get(7)?;
    let registered_at = parse_time(&registered_at).map_err(|error| {
        Error::Invalid(format!(
            "version {version} of activity type {activity_type:?} has an invalid \
             registration time: {error}"
        ))
    })?;
    let limit = |index: usize| row.get::<_, i64>(index).map(|value| value.max(0) as u64);
    Ok(ComponentVersion {
        limits: Limits {
            fuel: limit(3)?,
            memory_mib: limit(4)?,
            timeout_secs: limit(5)?,
            max_output_bytes: limit(6)?,
            retry: RetryPolicy {
                max_attempts: row.get::<_, i64>(9)?.clamp(1, i64::from(u32::MAX)) as u32,
                backoff_ms: limit(10)?,
                max_backoff_ms: limit(11)?,
            },
        },
        digest: row.get(2)?,
        registered_at,
        current: row.get(8)?,
        activity_type,
        version,
    })
}

/// Converts limits to SQLite integers, which are signed 64-bit.
fn limit_values(limits: &Limits) -> Result<[i64; 4]> {
    let fields = [
        ("fuel", limits.fuel),
        ("memory_mib", limits.memory_mib),
        ("timeout_secs", limits.timeout_secs),
        ("max_output_bytes", limits.max_output_bytes),
    ];
    let mut values = [0i64; 4];
    for (slot, (name, value)) in values.iter_mut().zip(fields) {
        *slot = i64::try_from(value).map_err(|_| {
            Error::Invalid(format!(
                "limit {name} = {value} is larger than the maximum {}",
                i64::MAX
            ))
        })?;
    }
    Ok(values)
}

/// Checks the arguments of a registration that every backend checks alike: the activity
/// type, the digest and engine hash (used in file names), and that the digest is the
/// SHA-256 of the `.wasm` bytes.
pub(in crate::backend) fn check_registration(
    activity_type: &str,
    digest: &str,
    engine_hash: &str,
    wasm: &[u8],
) -> Result<()> {
    validate::activity_type(activity_type)?;
    validate_digest(digest)?;
    validate_engine_hash(engine_hash)?;
    let actual = hex::encode(Sha256::digest(wasm));
    if actual != digest {
        return Err(Error::Invalid(format!(
            "component digest {digest:?} does not match the SHA-256 of the .wasm bytes, \
             which is {actual:?}"
        )));
    }
    Ok(())
}

/// Checks that a digest is 64 lower-case hex digits, the form of a SHA-256 digest.
pub(in crate::backend) fn validate_digest(digest: &str) -> Result<()> {
    let hex = digest
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if digest.len() == 64 && hex {
        return Ok(());
    }
    Err(Error::Invalid(format!(
        "invalid component digest {}: expected 64 lower-case hex digits (SHA-256)",
        validate::quote(digest)
    )))
}

/// Checks that an engine hash is safe in a file name: 1 to 128 ASCII letters, digits,
/// `_` or `-`.
pub(in crate::backend) fn validate_engine_hash(engine_hash: &str) -> Result<()> {
    let allowed = engine_hash
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if allowed && (1..=128).contains(&engine_hash.len()) {
        return Ok(());
    }
    Err(Error::Invalid(format!(
        "invalid engine hash {}: expected 1 to 128 ASCII letters, digits, '_' or '-'",
        validate::quote(engine_hash)
    )))
}

pub(in crate::backend) fn wasm_path(dir: &Path, digest: &str) -> PathBuf {
    dir.join(format!("{digest}.wasm"))
}

pub(in crate::backend) fn artifact_path(dir: &Path, digest: &str, engine_hash: &str) -> PathBuf {
    dir.join(format!("{digest}-{engine_hash}.cwasm"))
}

/// Writes a file through a temporary file in the same folder and a rename, so that
/// readers see either no file or the whole one.
pub(in crate::backend) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().expect("component paths have a folder");
    fs::create_dir_all(dir)
        .map_err(|error| Error::io(format!("failed to create {}", dir.display()), error))?;

    let file_name = path.file_name().unwrap_or_default().to_string_lossy();
    let temp = dir.join(format!(".{file_name}.{}.tmp", uuid::Uuid::new_v4()));
    let written = File::create_new(&temp).and_then(|mut file| {
        file.write_all(bytes)?;
        file.sync_all()
    });
    let renamed = written.and_then(|()| fs::rename(&temp, path));
    if let Err(error) = renamed {
        let _ = fs::remove_file(&temp);
        return Err(Error::io(
            format!("failed to write {}", path.display()),
            error,
        ));
    }
    Ok(())
}

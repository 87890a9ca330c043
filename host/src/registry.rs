//! Registering components and keeping the current version of each activity type loaded.
//!
//! Registration checks and compiles a component once. The compiled artifact is stored
//! beside the `.wasm` by digest and engine hash, so a daemon loads it in microseconds. The
//! [`ComponentCache`] follows the registry's generation counter and swaps in new versions
//! while tasks run: a task keeps the `Arc` of the version it started with.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use sha2::{Digest, Sha256};
use tokio::sync::Mutex as AsyncMutex;

use crate::backend::{Backend, ComponentRegistry, ComponentVersion, Limits};
use crate::sandbox::{PreparedComponent, Sandbox};
use crate::{validate, Error, Result};

/// Returns the SHA-256 of `bytes` in lower-case hex: the digest components are stored under.
pub fn digest_of(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Checks, compiles and stores a new version of `activity_type`, and makes it current.
///
/// On any error the registry is unchanged, so the previous version keeps serving.
pub async fn register(
    registry: &dyn ComponentRegistry,
    sandbox: &Sandbox,
    activity_type: &str,
    wasm: &[u8],
    limits: Limits,
) -> Result<ComponentVersion> {
    validate::activity_type(activity_type)?;
    check_limits(&limits)?;
    check_component_size(wasm.len())?;
    let digest = digest_of(wasm);
    let (_, artifact) = sandbox.compile(wasm).map_err(Error::Component)?;
    registry
        .register(
            activity_type,
            &digest,
            wasm,
            sandbox.engine_hash(),
            &artifact,
            limits,
        )
        .await
}

/// Checks that a component of `bytes` bytes is at most [`MAX_COMPONENT_BYTES`].
fn check_component_size(bytes: usize) -> Result<()> {
    if bytes > MAX_COMPONENT_BYTES {
        return Err(Error::Invalid(format!(
            "invalid component of {bytes} bytes: the maximum is {MAX_COMPONENT_BYTES} bytes (128 MiB)"
        )));
    }
    Ok(())
}

/// Largest `.wasm` file a registration accepts: 128 MiB. Every daemon compiles it and
/// keeps it in memory, and the largest components built from whole language runtimes are
/// tens of MiB.
pub const MAX_COMPONENT_BYTES: usize = 128 * 1024 * 1024;

/// Largest fuel budget. The stores keep limits as signed 64-bit integers.
pub const MAX_FUEL: u64 = i64::MAX as u64;

/// Largest memory limit in MiB, because a wasm32 memory is at most 4 GiB.
pub const MAX_MEMORY_MIB: u64 = 4096;

/// Longest deadline of one attempt, in seconds: 7 days.
pub const MAX_TIMEOUT_SECS: u64 = 7 * 24 * 3600;

/// Largest output blob limit in bytes. The stores keep limits as signed 64-bit integers.
pub const MAX_OUTPUT_BYTES: u64 = i64::MAX as u64;

/// Most attempts of one task.
pub const MAX_ATTEMPTS: u32 = 100;

/// Rejects limits that could never let a task run, or that the stores cannot keep.
pub fn check_limits(limits: &Limits) -> Result<()> {
    if limits.fuel == 0 || limits.fuel > MAX_FUEL {
        return Err(Error::Invalid(format!(
            "invalid fuel limit {}: it must be between 1 and {MAX_FUEL}",
            limits.fuel
        )));
    }
    if limits.memory_mib == 0 || limits.memory_mib > MAX_MEMORY_MIB {
        return Err(Error::Invalid(format!(
            "invalid memory limit {} MiB: it must be between 1 and {MAX_MEMORY_MIB} MiB (a wasm32 memory is at most 4 GiB)",
            limits.memory_mib
        )));
    }
    if limits.max_output_bytes > MAX_OUTPUT_BYTES {
        return Err(Error::Invalid(format!(
            "invalid output blob limit {} bytes: it must be between 0 and {MAX_OUTPUT_BYTES} bytes",
            limits.max_output_bytes
        )));
    }
    if limits.retry.max_attempts == 0 || limits.retry.max_attempts > MAX_ATTEMPTS {
        return Err(Error::Invalid(format!(
            "invalid max attempts {}: it must be between 1 and {MAX_ATTEMPTS}",
            limits.retry.max_attempts
        )));
    }
    if limits.retry.backoff_ms > limits.retry.max_backoff_ms {
        return Err(Error::Invalid(format!(
            "invalid retry backoff: the first delay of {} s is longer than the maximum of {} s",
            limits.retry.backoff_ms as f64 / 1000.0,
            limits.retry.max_backoff_ms as f64 / 1000.0
        )));
    }
    if limits.timeout_secs == 0 || limits.timeout_secs > MAX_TIMEOUT_SECS {
        return Err(Error::Invalid(format!(
            "invalid timeout {} s: it must be between 1 s and {MAX_TIMEOUT_SECS} s (7 days)",
            limits.timeout_secs
        )));
    }
    Ok(())
}

/// A component version ready to run.
pub struct LoadedComponent {
    pub version: ComponentVersion,
    pub prepared: PreparedComponent,
}

/// The current version of every activity type, loaded and prepared.
pub struct ComponentCache {
    sandbox: Arc<Sandbox>,
    backend: Arc<dyn Backend>,
    current: RwLock<Snapshot>,
    /// Serializes refreshes so that two tasks missing at once load a version only once.
    refresh_lock: AsyncMutex<()>,
}

#[derive(Default)]
struct Snapshot {
    generation: Option<u64>,
    by_type: HashMap<String, Arc<LoadedComponent>>,
}

impl ComponentCache {
    /// Creates an empty cache; call [`ComponentCache::refresh`] to load the registry.
    pub fn new(sandbox: Arc<Sandbox>, backend: Arc<dyn Backend>) -> Self {
        ComponentCache {
            sandbox,
            backend,
            current: RwLock::new(Snapshot::default()),
            refresh_lock: AsyncMutex::new(()),
        }
    }

    /// Returns the current version of an activity type, as of the last refresh.
    pub fn get(&self, activity_type: &str) -> Option<Arc<LoadedComponent>> {
        let snapshot = self.current.read().unwrap_or_else(|e| e.into_inner());
        snapshot.by_type.get(activity_type).cloned()
    }

    /// Reloads the current versions when the registry's generation has changed.
    /// Returns true when something changed.
    pub async fn refresh(&self) -> Result<bool> {
        let _guard = self.refresh_lock.lock().await;
        let generation = self.backend.registry().generation().await?;
        let known = self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .generation;
        if known == Some(generation) {
            return Ok(false);
        }

        let previous: HashMap<String, Arc<LoadedComponent>> = self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .by_type
            .clone();
        let mut by_type = HashMap::new();
        for version in self.backend.registry().versions(None).await? {
            if !version.current {
                continue;
            }
            let reused = previous
                .get(&version.activity_type)
                .filter(|loaded| loaded.version == version)
                .cloned();
            let loaded = match reused {
                Some(loaded) => loaded,
                None => match self.load(&version).await {
                    Ok(loaded) => Arc::new(loaded),
                    Err(error) => {
                        tracing::error!(
                            activity_type = %version.activity_type,
                            digest = %version.digest,
                            %error,
                            "failed to load component version"
                        );
                        continue;
                    }
                },
            };
            by_type.insert(version.activity_type.clone(), loaded);
        }

        let mut snapshot = self.current.write().unwrap_or_else(|e| e.into_inner());
        snapshot.generation = Some(generation);
        snapshot.by_type = by_type;
        Ok(true)
    }

    async fn load(&self, version: &ComponentVersion) -> Result<LoadedComponent> {
        let engine_hash = self.sandbox.engine_hash().to_owned();
        let artifact_path = self
            .backend
            .registry()
            .artifact_path(&version.digest, &engine_hash)
            .await?;
        let prepared = match artifact_path {
            Some(path) => {
                let artifact = std::fs::read(&path).map_err(|error| {
                    Error::io(format!("failed to read artifact {}", path.display()), error)
                })?;
                self.sandbox
                    .load_artifact(&artifact)
                    .map_err(Error::Component)?
            }
            None => {
                // Compiled by a host whose engine differs: compile here once and keep it.
                let wasm = self.backend.registry().load_wasm(&version.digest).await?;
                let (prepared, artifact) = self.sandbox.compile(&wasm).map_err(Error::Component)?;
                self.backend
                    .registry()
                    .store_artifact(&version.digest, &engine_hash, &artifact)
                    .await?;
                prepared
            }
        };
        tracing::info!(
            activity_type = %version.activity_type,
            version = version.version,
            digest = %version.digest,
            "loaded component version"
        );
        Ok(LoadedComponent {
            version: version.clone(),
            prepared,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEFAULT_LIMITS;

    #[test]
    fn component_over_size_limit_rejected() {
        assert!(check_component_size(MAX_COMPONENT_BYTES).is_ok());
        let error = check_component_size(MAX_COMPONENT_BYTES + 1)
            .unwrap_err()
            .to_string();
        assert_eq!(
            error,
            "invalid component of 134217729 bytes: the maximum is 134217728 bytes (128 MiB)"
        );
    }

    #[test]
    fn limits_above_i64_are_rejected() {
        let cases = [
            (
                Limits {
                    fuel: u64::MAX,
                    ..DEFAULT_LIMITS
                },
                "invalid fuel limit 18446744073709551615: it must be between 1 and 9223372036854775807",
            ),
            (
                Limits {
                    max_output_bytes: MAX_OUTPUT_BYTES + 1,
                    ..DEFAULT_LIMITS
                },
                "invalid output blob limit 9223372036854775808 bytes: it must be between 0 and 9223372036854775807 bytes",
            ),
        ];
        for (limits, expected) in cases {
            let error = check_limits(&limits).unwrap_err().to_string();
            assert_eq!(error, expected);
        }
        let largest = Limits {
            fuel: MAX_FUEL,
            max_output_bytes: MAX_OUTPUT_BYTES,
            ..DEFAULT_LIMITS
        };
        assert!(check_limits(&largest).is_ok());
    }
}

//! Settings of `bgw`, resolved from command-line values, environment variables, a TOML
//! file and defaults, in that order of precedence.
//!
//! Environment variables: `BGW_DATA_DIR`, `BGW_CONFIG`, `STORE_MODE`, `SQLITE_DB_PATH`,
//! `AZURE_STORAGE_CONNECTION_STRING`, `ACTIVE_TABLE_NAME`, `FINISHED_TABLE_NAME`,
//! `BGW_QUEUE`, `BGW_COMPONENT_TABLE`, `BGW_AZURE_SUBMIT_VISIBILITY_SECS` and
//! `BGW_AZURE_MAX_RETRY_SECS`. Those without the `BGW_` prefix have the names
//! `background-workflows` reads, so both can share one deployment. A variable set to the empty string counts as
//! unset. The connection string is read only from the environment, so that the account
//! key stays out of configuration files.
//!
//! The TOML file is `--config FILE` or `BGW_CONFIG` when given, and `<data dir>/bgw.toml`
//! otherwise if that file exists. Every key is optional and an unknown key is an error. A
//! relative `sqlite_db_path` in the file is relative to the data directory, whereas a
//! relative `SQLITE_DB_PATH` is relative to the current directory, as in
//! `background-workflows`:
//!
//! ```toml
//! store_mode = "sqlite"
//! sqlite_db_path = "/var/lib/bgw/bgw.db"
//! active_table_name = "ActiveTasks"
//! finished_table_name = "FinishedTasks"
//! queue = "bgw-tasks"
//! component_table_name = "BgwComponents"   # the registry table on Azure
//!
//! [sqlite]
//! synchronous = "full"          # default "normal"
//!
//! [daemon]
//! concurrency = 8               # 1 to 1024; default: number of CPU cores
//! visibility_timeout_secs = 30  # 1 to 604800 (7 days)
//!
//! [azure]
//! submit_visibility_secs = 120  # a new message stays hidden this long until its record is stored
//! max_retry_secs = 60           # time the Azure SDK retries a request that failed transiently
//!
//! [limits]                      # defaults for new registrations
//! fuel = 10_000_000_000
//! memory_mib = 512
//! timeout_secs = 60
//! max_output_bytes = 268_435_456
//!
//! [submit]
//! max_input_blob_bytes = 268_435_456   # larger input blobs are rejected
//! ```

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use crate::backend::azure::{
    AzureOptions, COMPONENT_TABLE, DEFAULT_MAX_RETRY, DEFAULT_SUBMIT_VISIBILITY,
    MAX_SUBMIT_VISIBILITY,
};
use crate::backend::sqlite::{SqliteOptions, Synchronous, DEFAULT_QUEUE};
use crate::backend::{Limits, RetryPolicy};
use crate::client::{DEFAULT_MAX_INPUT_BLOB_BYTES, MAX_INPUT_BLOB_BYTES};
use crate::daemon::{MAX_CONCURRENCY, MAX_VISIBILITY_TIMEOUT};
use crate::record::{DEFAULT_ACTIVE_TABLE, DEFAULT_FINISHED_TABLE};
use crate::{registry, validate, Error, Result};

/// Default limits of a new registration.
pub const DEFAULT_LIMITS: Limits = Limits {
    fuel: 10_000_000_000,
    memory_mib: 512,
    timeout_secs: 60,
    max_output_bytes: 256 * 1024 * 1024,
    retry: RetryPolicy {
        max_attempts: 3,
        backoff_ms: 1_000,
        max_backoff_ms: 60_000,
    },
};

/// Default time a leased message stays hidden before another daemon may take it over.
pub const DEFAULT_VISIBILITY_TIMEOUT: Duration = Duration::from_secs(30);

/// Name of the TOML file looked for in the data folder.
pub const CONFIG_FILE_NAME: &str = "bgw.toml";

/// Kind of backend for the task store and the queue, as set by `STORE_MODE`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreMode {
    /// One SQLite file and a local blob folder.
    #[default]
    Sqlite,
    /// Azure Storage tables, queues and blobs.
    Azure,
}

impl StoreMode {
    pub fn as_str(self) -> &'static str {
        match self {
            StoreMode::Sqlite => "sqlite",
            StoreMode::Azure => "azure",
        }
    }
}

impl FromStr for StoreMode {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        match text.to_ascii_lowercase().as_str() {
            "sqlite" => Ok(StoreMode::Sqlite),
            "azure" => Ok(StoreMode::Azure),
            _ => Err(Error::Invalid(format!(
                "invalid store mode {text:?}: expected \"sqlite\" or \"azure\""
            ))),
        }
    }
}

/// Values given on the command line. Each one that is set wins over every other source.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub data_dir: Option<PathBuf>,
    /// TOML file to read. It must exist.
    pub config_file: Option<PathBuf>,
    pub store_mode: Option<StoreMode>,
    pub sqlite_db_path: Option<PathBuf>,
    pub active_table_name: Option<String>,
    pub finished_table_name: Option<String>,
    pub queue: Option<String>,
    pub synchronous: Option<Synchronous>,
    pub concurrency: Option<usize>,
    pub visibility_timeout_secs: Option<u64>,
}

/// Resolved settings.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// Folder of the database, the blobs, the components and the default TOML file.
    pub data_dir: PathBuf,
    /// The TOML file that was read, if any.
    pub config_file: Option<PathBuf>,
    pub store_mode: StoreMode,
    /// The SQLite database file, absolute.
    pub sqlite_db_path: PathBuf,
    /// `AZURE_STORAGE_CONNECTION_STRING`, needed when `store_mode` is Azure.
    pub azure_connection_string: Option<ConnectionString>,
    pub active_table_name: String,
    pub finished_table_name: String,
    /// Name of the task queue.
    pub queue: String,
    /// Table of the component registry on Azure; SQLite keeps the registry in its file.
    pub component_table_name: String,
    pub synchronous: Synchronous,
    /// Maximum number of tasks a daemon runs at once.
    pub concurrency: usize,
    /// Time a leased message stays hidden before another daemon may take it over.
    pub visibility_timeout: Duration,
    /// Limits given to a new registration that sets none of its own.
    pub limits: Limits,
    /// Maximum size of the input blob of a task that a client submits, in bytes.
    pub max_input_blob_bytes: u64,
    /// Time a message that an Azure submit enqueues stays hidden until the submit has
    /// stored the task record and made the message visible.
    pub azure_submit_visibility: Duration,
    /// Time the Azure SDK goes on retrying a request that timed out, was throttled, failed
    /// with a 5xx status or an I/O error.
    pub azure_max_retry: Duration,
}

impl Settings {
    /// Resolves the settings from `overrides`, the process environment, the TOML file and
    /// the defaults.
    pub fn resolve(overrides: &Overrides) -> Result<Settings> {
        Settings::resolve_with(overrides, &|name| std::env::var(name).ok())
    }

    /// Resolves the settings with `env` in place of the process environment.
    pub fn resolve_with(
        overrides: &Overrides,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Settings> {
        let env = |name: &str| env(name).filter(|value| !value.is_empty());
        let current_dir = std::env::current_dir()
            .map_err(|error| Error::io("failed to read the current directory", error))?;

        let data_dir = match overrides.data_dir.clone() {
            Some(dir) => dir,
            None => match env("BGW_DATA_DIR") {
                Some(dir) => PathBuf::from(dir),
                None => default_data_dir(&env)?,
            },
        };
        let data_dir = current_dir.join(data_dir);
        let (file, config_file) = read_config_file(overrides, &env, &data_dir)?;

        let store_mode = match (overrides.store_mode, env("STORE_MODE")) {
            (Some(mode), _) => mode,
            (None, Some(text)) => text
                .parse()
                .map_err(|error| Error::Invalid(format!("invalid STORE_MODE: {error}")))?,
            (None, None) => file.store_mode.unwrap_or_default(),
        };
        // A relative SQLITE_DB_PATH is relative to the current directory, because
        // `background-workflows` reads it that way. A relative path from the file is relative
        // to the data directory, so the file names one database wherever `bgw` runs.
        let sqlite_db_path = overrides
            .sqlite_db_path
            .clone()
            .or_else(|| env("SQLITE_DB_PATH").map(PathBuf::from))
            .or_else(|| file.sqlite_db_path.map(|path| data_dir.join(path)))
            .unwrap_or_else(|| data_dir.join("bgw.db"));
        // The file's names were checked when it was read. A name from the command line or
        // the environment is checked here, and its error names the flag or the variable.
        let name_setting = |given: &Option<String>,
                            flag: &str,
                            variable: &str,
                            from_file: Option<String>,
                            default: &str,
                            check: &dyn Fn(&str) -> Result<()>| {
            let (value, source) = match (given, env(variable)) {
                (Some(value), _) => (value.clone(), flag),
                (None, Some(value)) => (value, variable),
                (None, None) => return Ok(from_file.unwrap_or_else(|| default.to_owned())),
            };
            check(&value).map_err(|error| Error::Invalid(format!("{source}: {error}")))?;
            Ok::<_, Error>(value)
        };
        let active_table_name = name_setting(
            &overrides.active_table_name,
            "the command line",
            "ACTIVE_TABLE_NAME",
            file.active_table_name,
            DEFAULT_ACTIVE_TABLE,
            &validate::table_name,
        )?;
        let finished_table_name = name_setting(
            &overrides.finished_table_name,
            "the command line",
            "FINISHED_TABLE_NAME",
            file.finished_table_name,
            DEFAULT_FINISHED_TABLE,
            &validate::table_name,
        )?;
        let queue = name_setting(
            &overrides.queue,
            "--queue",
            "BGW_QUEUE",
            file.queue,
            DEFAULT_QUEUE,
            &check_queue_name,
        )?;
        let component_table_name = name_setting(
            &None,
            "the command line",
            "BGW_COMPONENT_TABLE",
            file.component_table_name,
            COMPONENT_TABLE,
            &validate::table_name,
        )?;

        let daemon = file.daemon;
        let concurrency = overrides
            .concurrency
            .or(daemon.concurrency)
            .unwrap_or_else(default_concurrency);
        let visibility_secs = overrides
            .visibility_timeout_secs
            .or(daemon.visibility_timeout_secs)
            .unwrap_or(DEFAULT_VISIBILITY_TIMEOUT.as_secs());
        let limits = file.limits;
        let azure_submit_visibility_secs = seconds_setting(
            &env,
            "BGW_AZURE_SUBMIT_VISIBILITY_SECS",
            file.azure.submit_visibility_secs,
            DEFAULT_SUBMIT_VISIBILITY,
        )?;
        let azure_max_retry_secs = seconds_setting(
            &env,
            "BGW_AZURE_MAX_RETRY_SECS",
            file.azure.max_retry_secs,
            DEFAULT_MAX_RETRY,
        )?;

        let settings = Settings {
            sqlite_db_path: current_dir.join(sqlite_db_path),
            azure_connection_string: env("AZURE_STORAGE_CONNECTION_STRING").map(ConnectionString),
            config_file,
            store_mode,
            active_table_name,
            finished_table_name,
            queue,
            component_table_name,
            synchronous: overrides
                .synchronous
                .or(file.sqlite.synchronous)
                .unwrap_or_default(),
            concurrency,
            visibility_timeout: Duration::from_secs(visibility_secs),
            limits: Limits {
                fuel: limits.fuel.unwrap_or(DEFAULT_LIMITS.fuel),
                memory_mib: limits.memory_mib.unwrap_or(DEFAULT_LIMITS.memory_mib),
                timeout_secs: limits.timeout_secs.unwrap_or(DEFAULT_LIMITS.timeout_secs),
                max_output_bytes: limits
                    .max_output_bytes
                    .unwrap_or(DEFAULT_LIMITS.max_output_bytes),
                retry: DEFAULT_LIMITS.retry,
            },
            max_input_blob_bytes: file
                .submit
                .max_input_blob_bytes
                .unwrap_or(DEFAULT_MAX_INPUT_BLOB_BYTES),
            azure_submit_visibility: Duration::from_secs(azure_submit_visibility_secs),
            azure_max_retry: Duration::from_secs(azure_max_retry_secs),
            data_dir,
        };
        settings.validate()?;
        Ok(settings)
    }

    /// Fails unless the settings the store mode needs are present: Azure needs a
    /// connection string.
    pub fn check_supported(&self) -> Result<()> {
        match (self.store_mode, &self.azure_connection_string) {
            (StoreMode::Sqlite, _) | (StoreMode::Azure, Some(_)) => Ok(()),
            (StoreMode::Azure, None) => Err(Error::Invalid(
                "STORE_MODE=azure needs AZURE_STORAGE_CONNECTION_STRING, which is not set; \
                 set it to the storage account's connection string"
                    .to_owned(),
            )),
        }
    }

    /// Options to open the Azure backend with these settings, or `None` without a
    /// connection string.
    pub fn azure_options(&self) -> Option<AzureOptions> {
        let connection_string = self.azure_connection_string.as_ref()?;
        Some(AzureOptions {
            active_table: self.active_table_name.clone(),
            finished_table: self.finished_table_name.clone(),
            queue_name: self.queue.clone(),
            component_table: self.component_table_name.clone(),
            submit_visibility: self.azure_submit_visibility,
            max_retry: self.azure_max_retry,
            ..AzureOptions::new(connection_string.0.clone(), self.component_dir())
        })
    }

    /// Returns the path of the SQLite database file.
    pub fn db_path(&self) -> &Path {
        &self.sqlite_db_path
    }

    /// Root folder of the local blob containers: `<data dir>/blobs`.
    pub fn blob_dir(&self) -> PathBuf {
        self.data_dir.join("blobs")
    }

    /// Folder of the registered components: `<data dir>/components`.
    pub fn component_dir(&self) -> PathBuf {
        self.data_dir.join("components")
    }

    /// Options to open the SQLite backend with these settings.
    pub fn sqlite_options(&self) -> SqliteOptions {
        SqliteOptions {
            active_table: self.active_table_name.clone(),
            finished_table: self.finished_table_name.clone(),
            queue_name: self.queue.clone(),
            synchronous: self.synchronous,
            ..SqliteOptions::new(self.db_path(), self.blob_dir(), self.component_dir())
        }
    }

    /// Checks the values that [`Overrides`] can set and the file did not already check.
    fn validate(&self) -> Result<()> {
        let ranges = [
            (
                "concurrency",
                self.concurrency as u64,
                MAX_CONCURRENCY as u64,
                "",
            ),
            (
                "visibility timeout",
                self.visibility_timeout.as_secs(),
                MAX_VISIBILITY_TIMEOUT.as_secs(),
                " s",
            ),
        ];
        for (name, value, max, unit) in ranges {
            if !(1..=max).contains(&value) {
                return Err(Error::Invalid(format!(
                    "invalid {name} {value}{unit}: it must be from 1 to {max}{unit}"
                )));
            }
        }
        let submit_visibility = self.azure_submit_visibility;
        if submit_visibility.is_zero() || submit_visibility > MAX_SUBMIT_VISIBILITY {
            return Err(Error::Invalid(format!(
                "azure.submit_visibility_secs must be from 1 to {}, but it is {}",
                MAX_SUBMIT_VISIBILITY.as_secs(),
                submit_visibility.as_secs()
            )));
        }
        Ok(())
    }
}

fn check_queue_name(name: &str) -> Result<()> {
    validate::azure_name("queue name", name)
}

/// A connection string, kept out of `Debug` output because it contains the account key.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnectionString(pub String);

impl std::fmt::Debug for ConnectionString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConnectionString(<redacted>)")
    }
}

/// Contents of the TOML file. Every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSettings {
    store_mode: Option<StoreMode>,
    sqlite_db_path: Option<PathBuf>,
    active_table_name: Option<String>,
    finished_table_name: Option<String>,
    queue: Option<String>,
    component_table_name: Option<String>,
    #[serde(default)]
    sqlite: SqliteSection,
    #[serde(default)]
    daemon: DaemonSection,
    #[serde(default)]
    limits: LimitsSection,
    #[serde(default)]
    azure: AzureSection,
    #[serde(default)]
    submit: SubmitSection,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SqliteSection {
    synchronous: Option<Synchronous>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DaemonSection {
    concurrency: Option<usize>,
    visibility_timeout_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AzureSection {
    submit_visibility_secs: Option<u64>,
    max_retry_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SubmitSection {
    max_input_blob_bytes: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsSection {
    fuel: Option<u64>,
    memory_mib: Option<u64>,
    timeout_secs: Option<u64>,
    max_output_bytes: Option<u64>,
}

/// A check of a table or queue name.
type NameCheck = fn(&str) -> Result<()>;

impl FileSettings {
    /// Checks the names and numbers of the file, naming the key and the file in each error.
    fn validate(&self, path: &Path) -> Result<()> {
        let names: [(&str, &Option<String>, NameCheck); 4] = [
            (
                "active_table_name",
                &self.active_table_name,
                validate::table_name,
            ),
            (
                "finished_table_name",
                &self.finished_table_name,
                validate::table_name,
            ),
            (
                "component_table_name",
                &self.component_table_name,
                validate::table_name,
            ),
            ("queue", &self.queue, check_queue_name),
        ];
        for (key, value, check) in names {
            if let Some(value) = value {
                check(value).map_err(|error| {
                    Error::Invalid(format!("{key} in config file {}: {error}", path.display()))
                })?;
            }
        }

        let numbers = [
            (
                "daemon.concurrency",
                self.daemon.concurrency.map(|value| value as u64),
                1,
                MAX_CONCURRENCY as u64,
            ),
            (
                "daemon.visibility_timeout_secs",
                self.daemon.visibility_timeout_secs,
                1,
                MAX_VISIBILITY_TIMEOUT.as_secs(),
            ),
            ("limits.fuel", self.limits.fuel, 1, registry::MAX_FUEL),
            (
                "limits.memory_mib",
                self.limits.memory_mib,
                1,
                registry::MAX_MEMORY_MIB,
            ),
            (
                "limits.timeout_secs",
                self.limits.timeout_secs,
                1,
                registry::MAX_TIMEOUT_SECS,
            ),
            (
                "limits.max_output_bytes",
                self.limits.max_output_bytes,
                0,
                registry::MAX_OUTPUT_BYTES,
            ),
            (
                "submit.max_input_blob_bytes",
                self.submit.max_input_blob_bytes,
                0,
                MAX_INPUT_BLOB_BYTES,
            ),
        ];
        for (key, value, min, max) in numbers {
            let Some(value) = value.filter(|value| !(min..=max).contains(value)) else {
                continue;
            };
            let range = match max {
                u64::MAX => format!("at least {min}"),
                _ => format!("between {min} and {max}"),
            };
            return Err(Error::Invalid(format!(
                "invalid {key} {value} in config file {}: it must be {range}",
                path.display()
            )));
        }
        Ok(())
    }
}

/// Returns `$XDG_DATA_HOME/bgw`, or else `~/.local/share/bgw`. A relative `XDG_DATA_HOME`
/// is ignored, as the XDG base directory specification requires.
fn default_data_dir(env: &dyn Fn(&str) -> Option<String>) -> Result<PathBuf> {
    if let Some(dir) = env("XDG_DATA_HOME")
        .map(PathBuf::from)
        .filter(|dir| dir.is_absolute())
    {
        return Ok(dir.join("bgw"));
    }
    match env("HOME") {
        Some(home) => Ok(PathBuf::from(home).join(".local/share/bgw")),
        None => Err(Error::Invalid(
            "cannot choose a data folder because HOME is not set; set BGW_DATA_DIR or \
             pass --data-dir"
                .to_owned(),
        )),
    }
}

/// Reads the TOML file given by `--config` or `BGW_CONFIG`, which must exist, or else
/// `<data dir>/bgw.toml` if it exists. Returns the contents and the file read.
fn read_config_file(
    overrides: &Overrides,
    env: &dyn Fn(&str) -> Option<String>,
    data_dir: &Path,
) -> Result<(FileSettings, Option<PathBuf>)> {
    let (path, required) = match (&overrides.config_file, env("BGW_CONFIG")) {
        (Some(path), _) => (path.clone(), Some("--config")),
        (None, Some(path)) => (PathBuf::from(path), Some("BGW_CONFIG")),
        (None, None) => (data_dir.join(CONFIG_FILE_NAME), None),
    };

    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return match required {
                Some(source) => Err(Error::NotFound(format!(
                    "config file {} (set by {source}) not found",
                    path.display()
                ))),
                None => Ok((FileSettings::default(), None)),
            };
        }
        Err(error) => {
            return Err(Error::io(
                format!("failed to read config file {}", path.display()),
                error,
            ));
        }
    };

    let settings: FileSettings = toml::from_str(&text).map_err(|error| {
        let position = error.span().map(|span| {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |index| index + 1) + 1;
            format!(" at line {line}, column {column}")
        });
        Error::Invalid(format!(
            "invalid config file {}{}: {}",
            path.display(),
            position.unwrap_or_default(),
            error.message()
        ))
    })?;
    settings.validate(&path)?;
    Ok((settings, Some(path)))
}

/// Reads a whole number of seconds from the environment variable `name`, or else from the
/// file, or else takes `default`.
fn seconds_setting(
    env: &dyn Fn(&str) -> Option<String>,
    name: &str,
    from_file: Option<u64>,
    default: Duration,
) -> Result<u64> {
    let Some(text) = env(name) else {
        return Ok(from_file.unwrap_or(default.as_secs()));
    };
    text.trim().parse().map_err(|_| {
        Error::Invalid(format!(
            "invalid {name} {text:?}: expected a whole number of seconds"
        ))
    })
}

fn default_concurrency() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |cores| cores.get())
        .min(MAX_CONCURRENCY)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// Returns an environment with the given variables and nothing else.
    fn environment(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect();
        move |name| map.get(name).cloned()
    }

    fn with_data_dir(dir: &Path) -> Overrides {
        Overrides {
            data_dir: Some(dir.to_owned()),
            ..Overrides::default()
        }
    }

    fn invalid_message(result: Result<Settings>) -> String {
        match result {
            Err(Error::Invalid(message)) => message,
            other => panic!("expected Error::Invalid, got {other:?}"),
        }
    }

    #[test]
    fn defaults_without_any_source() {
        let home = tempfile::tempdir().unwrap();
        let env = environment(&[("HOME", home.path().to_str().unwrap())]);
        let settings = Settings::resolve_with(&Overrides::default(), &env).unwrap();

        let data_dir = home.path().join(".local/share/bgw");
        assert_eq!(settings.data_dir, data_dir);
        assert_eq!(settings.config_file, None);
        assert_eq!(settings.store_mode, StoreMode::Sqlite);
        assert_eq!(settings.db_path(), data_dir.join("bgw.db"));
        assert_eq!(settings.blob_dir(), data_dir.join("blobs"));
        assert_eq!(settings.component_dir(), data_dir.join("components"));
        assert_eq!(settings.active_table_name, "ActiveTasks");
        assert_eq!(settings.finished_table_name, "FinishedTasks");
        assert_eq!(settings.queue, "bgw-tasks");
        assert_eq!(settings.synchronous, Synchronous::Normal);
        assert_eq!(settings.concurrency, default_concurrency());
        assert_eq!(settings.visibility_timeout, Duration::from_secs(30));
        assert_eq!(settings.limits, DEFAULT_LIMITS);
        assert_eq!(settings.limits.max_output_bytes, 268_435_456);
        assert_eq!(settings.max_input_blob_bytes, 268_435_456);
    }

    #[test]
    fn xdg_data_home_wins_over_home() {
        let env = environment(&[("HOME", "/home/user"), ("XDG_DATA_HOME", "/data")]);
        let settings = Settings::resolve_with(&Overrides::default(), &env).unwrap();
        assert_eq!(settings.data_dir, PathBuf::from("/data/bgw"));

        let env = environment(&[("HOME", "/home/user"), ("XDG_DATA_HOME", "relative")]);
        let settings = Settings::resolve_with(&Overrides::default(), &env).unwrap();
        assert_eq!(
            settings.data_dir,
            PathBuf::from("/home/user/.local/share/bgw")
        );
    }

    #[test]
    fn missing_home_needs_data_dir() {
        let error = invalid_message(Settings::resolve_with(
            &Overrides::default(),
            &environment(&[]),
        ));
        assert!(error.contains("BGW_DATA_DIR"), "{error}");
    }

    #[test]
    fn command_line_beats_environment_beats_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(CONFIG_FILE_NAME),
            "active_table_name = \"FileActive\"\n\
             finished_table_name = \"FileFinished\"\n\
             queue = \"file-queue\"\n\
             sqlite_db_path = \"/file/tasks.db\"\n",
        )
        .unwrap();
        let env = environment(&[
            ("BGW_DATA_DIR", dir.path().to_str().unwrap()),
            ("ACTIVE_TABLE_NAME", "EnvActive"),
            ("FINISHED_TABLE_NAME", "EnvFinished"),
            ("SQLITE_DB_PATH", "/env/tasks.db"),
        ]);
        let overrides = Overrides {
            active_table_name: Some("CliActive".into()),
            ..Overrides::default()
        };
        let settings = Settings::resolve_with(&overrides, &env).unwrap();

        assert_eq!(
            settings.config_file,
            Some(dir.path().join(CONFIG_FILE_NAME))
        );
        assert_eq!(settings.active_table_name, "CliActive");
        assert_eq!(settings.finished_table_name, "EnvFinished");
        assert_eq!(settings.queue, "file-queue");
        assert_eq!(settings.db_path(), Path::new("/env/tasks.db"));
    }

    #[test]
    fn file_beats_defaults() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(CONFIG_FILE_NAME),
            "store_mode = \"azure\"\n\
             [sqlite]\nsynchronous = \"normal\"\n\
             [daemon]\nconcurrency = 3\nvisibility_timeout_secs = 90\n\
             [limits]\nfuel = 5\nmemory_mib = 64\ntimeout_secs = 7\nmax_output_bytes = 1024\n\
             [submit]\nmax_input_blob_bytes = 2048\n",
        )
        .unwrap();
        let settings =
            Settings::resolve_with(&with_data_dir(dir.path()), &environment(&[])).unwrap();

        assert_eq!(settings.store_mode, StoreMode::Azure);
        assert_eq!(settings.synchronous, Synchronous::Normal);
        assert_eq!(settings.concurrency, 3);
        assert_eq!(settings.visibility_timeout, Duration::from_secs(90));
        let expected = Limits {
            fuel: 5,
            memory_mib: 64,
            timeout_secs: 7,
            max_output_bytes: 1024,
            retry: DEFAULT_LIMITS.retry,
        };
        assert_eq!(settings.limits, expected);
        assert_eq!(settings.max_input_blob_bytes, 2048);
    }

    #[test]
    fn command_line_beats_file_for_daemon_values() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(CONFIG_FILE_NAME),
            "[sqlite]\nsynchronous = \"normal\"\n[daemon]\nconcurrency = 3\nvisibility_timeout_secs = 90\n",
        )
        .unwrap();
        let overrides = Overrides {
            synchronous: Some(Synchronous::Full),
            concurrency: Some(12),
            visibility_timeout_secs: Some(5),
            store_mode: Some(StoreMode::Sqlite),
            ..with_data_dir(dir.path())
        };
        let env = environment(&[("STORE_MODE", "azure")]);
        let settings = Settings::resolve_with(&overrides, &env).unwrap();

        assert_eq!(settings.synchronous, Synchronous::Full);
        assert_eq!(settings.concurrency, 12);
        assert_eq!(settings.visibility_timeout, Duration::from_secs(5));
        assert_eq!(settings.store_mode, StoreMode::Sqlite);
    }

    #[test]
    fn environment_beats_file_for_store_mode() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(CONFIG_FILE_NAME),
            "store_mode = \"sqlite\"\n",
        )
        .unwrap();
        let env = environment(&[("STORE_MODE", "azure")]);
        let settings = Settings::resolve_with(&with_data_dir(dir.path()), &env).unwrap();
        assert_eq!(settings.store_mode, StoreMode::Azure);
    }

    #[test]
    fn command_line_data_dir_beats_environment() {
        let env = environment(&[("BGW_DATA_DIR", "/env/data")]);
        let settings =
            Settings::resolve_with(&with_data_dir(Path::new("/cli/data")), &env).unwrap();
        assert_eq!(settings.data_dir, PathBuf::from("/cli/data"));
        assert_eq!(settings.db_path(), Path::new("/cli/data/bgw.db"));
    }

    #[test]
    fn empty_variable_counts_as_unset() {
        let env = environment(&[
            ("BGW_DATA_DIR", "/data"),
            ("STORE_MODE", ""),
            ("BGW_QUEUE", ""),
        ]);
        let settings = Settings::resolve_with(&Overrides::default(), &env).unwrap();
        assert_eq!(settings.store_mode, StoreMode::Sqlite);
        assert_eq!(settings.queue, "bgw-tasks");
    }

    #[test]
    fn relative_db_path_is_relative_to_current_dir() {
        let env = environment(&[
            ("BGW_DATA_DIR", "/data"),
            ("SQLITE_DB_PATH", "local_tasks.db"),
        ]);
        let settings = Settings::resolve_with(&Overrides::default(), &env).unwrap();
        let expected = std::env::current_dir().unwrap().join("local_tasks.db");
        assert_eq!(settings.db_path(), expected);
    }

    #[test]
    fn file_db_path_relative_to_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("elsewhere.toml");
        std::fs::write(&config, "sqlite_db_path = \"db/tasks.db\"\n").unwrap();
        let data_dir = dir.path().join("data");
        let overrides = Overrides {
            config_file: Some(config),
            ..with_data_dir(&data_dir)
        };
        let settings = Settings::resolve_with(&overrides, &environment(&[])).unwrap();
        assert_eq!(settings.db_path(), data_dir.join("db/tasks.db"));

        // SQLITE_DB_PATH still wins over the file, and stays relative to the current directory.
        let env = environment(&[("SQLITE_DB_PATH", "env.db")]);
        let settings = Settings::resolve_with(&overrides, &env).unwrap();
        let expected = std::env::current_dir().unwrap().join("env.db");
        assert_eq!(settings.db_path(), expected);
    }

    #[test]
    fn explicit_config_file_must_exist() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.toml");
        let overrides = Overrides {
            config_file: Some(missing.clone()),
            ..with_data_dir(dir.path())
        };
        match Settings::resolve_with(&overrides, &environment(&[])) {
            Err(Error::NotFound(message)) => {
                assert!(
                    message.contains(&missing.display().to_string()),
                    "{message}"
                );
                assert!(message.contains("--config"), "{message}");
            }
            other => panic!("expected NotFound, got {other:?}"),
        }

        let env = environment(&[("BGW_CONFIG", missing.to_str().unwrap())]);
        match Settings::resolve_with(&with_data_dir(dir.path()), &env) {
            Err(Error::NotFound(message)) => assert!(message.contains("BGW_CONFIG"), "{message}"),
            other => panic!("expected NotFound, got {other:?}"),
        }
    }

    #[test]
    fn command_line_config_beats_bgw_config() {
        let dir = tempfile::tempdir().unwrap();
        let cli_file = dir.path().join("cli.toml");
        let env_file = dir.path().join("env.toml");
        std::fs::write(&cli_file, "queue = \"cli-queue\"\n").unwrap();
        std::fs::write(&env_file, "queue = \"env-queue\"\n").unwrap();
        let overrides = Overrides {
            config_file: Some(cli_file.clone()),
            ..with_data_dir(dir.path())
        };
        let env = environment(&[("BGW_CONFIG", env_file.to_str().unwrap())]);
        let settings = Settings::resolve_with(&overrides, &env).unwrap();
        assert_eq!(settings.queue, "cli-queue");
        assert_eq!(settings.config_file, Some(cli_file));

        let settings = Settings::resolve_with(&with_data_dir(dir.path()), &env).unwrap();
        assert_eq!(settings.queue, "env-queue");
    }

    #[test]
    fn unknown_key_names_key_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CONFIG_FILE_NAME);
        let cases = [
            ("queu = \"x\"\n", "queu", 1),
            ("[daemon]\nconcurrency = 2\nworkers = 4\n", "workers", 3),
            ("[limits]\nfuel_budget = 1\n", "fuel_budget", 2),
            ("[sqlite]\njournal = \"wal\"\n", "journal", 2),
            ("[azure]\naccount = \"a\"\n", "account", 2),
        ];
        for (text, key, line) in cases {
            std::fs::write(&path, text).unwrap();
            let error = invalid_message(Settings::resolve_with(
                &with_data_dir(dir.path()),
                &environment(&[]),
            ));
            assert!(error.contains(&format!("`{key}`")), "{error}");
            assert!(error.contains(&path.display().to_string()), "{error}");
            assert!(error.contains(&format!("line {line},")), "{error}");
        }
    }

    #[test]
    fn invalid_values_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CONFIG_FILE_NAME);
        std::fs::write(&path, "[sqlite]\nsynchronous = \"off\"\n").unwrap();
        let error = invalid_message(Settings::resolve_with(
            &with_data_dir(dir.path()),
            &environment(&[]),
        ));
        assert!(error.contains("`off`"), "{error}");

        let cases = [
            (
                "[daemon]\nconcurrency = 0\n",
                "invalid daemon.concurrency 0",
                "between 1 and 1024",
            ),
            (
                "[daemon]\nconcurrency = 9223372036854775807\n",
                "invalid daemon.concurrency 9223372036854775807",
                "between 1 and 1024",
            ),
            (
                "[daemon]\nvisibility_timeout_secs = 9223372036854775807\n",
                "invalid daemon.visibility_timeout_secs 9223372036854775807",
                "between 1 and 604800",
            ),
            (
                "[limits]\nmemory_mib = 99999\n",
                "invalid limits.memory_mib 99999",
                "between 1 and 4096",
            ),
            (
                "[limits]\nfuel = 0\n",
                "invalid limits.fuel 0",
                "between 1 and 9223372036854775807",
            ),
            (
                "[limits]\ntimeout_secs = 604801\n",
                "invalid limits.timeout_secs 604801",
                "between 1 and 604800",
            ),
            (
                "queue = \"Tasks\"\n",
                "queue in config file",
                "invalid queue name",
            ),
            (
                "active_table_name = \"1x\"\n",
                "active_table_name in config file",
                "invalid table name",
            ),
        ];
        for (text, key, rule) in cases {
            std::fs::write(&path, text).unwrap();
            let error = invalid_message(Settings::resolve_with(
                &with_data_dir(dir.path()),
                &environment(&[]),
            ));
            assert!(error.contains(key), "{text:?}: {error}");
            assert!(error.contains(rule), "{text:?}: {error}");
            assert!(
                error.contains(&path.display().to_string()),
                "{text:?}: {error}"
            );
        }

        std::fs::remove_file(&path).unwrap();
        let env = environment(&[("STORE_MODE", "redis")]);
        let error = invalid_message(Settings::resolve_with(&with_data_dir(dir.path()), &env));
        assert!(error.contains("STORE_MODE"), "{error}");
        assert!(error.contains("\"redis\""), "{error}");
    }

    #[test]
    fn daemon_overrides_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (
                Overrides {
                    concurrency: Some(1025),
                    ..with_data_dir(dir.path())
                },
                "invalid concurrency 1025: it must be from 1 to 1024",
            ),
            (
                Overrides {
                    visibility_timeout_secs: Some(604_801),
                    ..with_data_dir(dir.path())
                },
                "invalid visibility timeout 604801 s: it must be from 1 to 604800 s",
            ),
        ];
        for (overrides, expected) in cases {
            let error = invalid_message(Settings::resolve_with(&overrides, &environment(&[])));
            assert_eq!(error, expected);
        }
    }

    #[test]
    fn table_and_queue_names_are_checked() {
        let env = environment(&[
            ("BGW_DATA_DIR", "/data"),
            ("ACTIVE_TABLE_NAME", "Active; DROP TABLE x"),
        ]);
        let error = invalid_message(Settings::resolve_with(&Overrides::default(), &env));
        assert!(
            error.contains("invalid table name \"Active; DROP TABLE x\""),
            "{error}"
        );

        assert!(error.starts_with("ACTIVE_TABLE_NAME: "), "{error}");

        let env = environment(&[("BGW_DATA_DIR", "/data"), ("BGW_QUEUE", "Tasks")]);
        let error = invalid_message(Settings::resolve_with(&Overrides::default(), &env));
        assert!(error.contains("invalid queue name \"Tasks\""), "{error}");
        assert!(error.starts_with("BGW_QUEUE: "), "{error}");

        let overrides = Overrides {
            queue: Some("Tasks".into()),
            ..with_data_dir(Path::new("/data"))
        };
        let error = invalid_message(Settings::resolve_with(&overrides, &environment(&[])));
        assert!(error.starts_with("--queue: "), "{error}");
    }

    #[test]
    fn azure_mode_needs_connection_string() {
        let env = environment(&[("BGW_DATA_DIR", "/data"), ("STORE_MODE", "azure")]);
        let settings = Settings::resolve_with(&Overrides::default(), &env).unwrap();
        assert_eq!(settings.store_mode, StoreMode::Azure);
        let error = settings.check_supported().unwrap_err().to_string();
        assert!(error.contains("AZURE_STORAGE_CONNECTION_STRING"), "{error}");
        assert!(settings.azure_options().is_none());

        let env = environment(&[
            ("BGW_DATA_DIR", "/data"),
            ("STORE_MODE", "azure"),
            (
                "AZURE_STORAGE_CONNECTION_STRING",
                "AccountName=a;AccountKey=secret",
            ),
            ("BGW_QUEUE", "q-two"),
            ("BGW_COMPONENT_TABLE", "Registry2"),
        ]);
        let settings = Settings::resolve_with(&Overrides::default(), &env).unwrap();
        assert!(settings.check_supported().is_ok());
        assert!(!format!("{settings:?}").contains("secret"));
        let options = settings.azure_options().unwrap();
        assert_eq!(options.queue_name, "q-two");
        assert_eq!(options.component_table, "Registry2");
        assert_eq!(options.component_dir, PathBuf::from("/data/components"));

        let env = environment(&[("BGW_DATA_DIR", "/data")]);
        let settings = Settings::resolve_with(&Overrides::default(), &env).unwrap();
        assert!(settings.check_supported().is_ok());
        assert_eq!(settings.component_table_name, "BgwComponents");

        let env = environment(&[("BGW_DATA_DIR", "/data"), ("BGW_COMPONENT_TABLE", "1x")]);
        let error = invalid_message(Settings::resolve_with(&Overrides::default(), &env));
        assert!(error.contains("invalid table name \"1x\""), "{error}");
    }

    #[test]
    fn azure_submit_settings_resolve_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let settings =
            Settings::resolve_with(&with_data_dir(dir.path()), &environment(&[])).unwrap();
        assert_eq!(settings.azure_submit_visibility, Duration::from_secs(120));
        assert_eq!(settings.azure_max_retry, Duration::from_secs(60));

        std::fs::write(
            dir.path().join(CONFIG_FILE_NAME),
            "[azure]\nsubmit_visibility_secs = 5\nmax_retry_secs = 7\n",
        )
        .unwrap();
        let settings =
            Settings::resolve_with(&with_data_dir(dir.path()), &environment(&[])).unwrap();
        assert_eq!(settings.azure_submit_visibility, Duration::from_secs(5));
        assert_eq!(settings.azure_max_retry, Duration::from_secs(7));

        let env = environment(&[
            ("BGW_AZURE_SUBMIT_VISIBILITY_SECS", "2"),
            ("BGW_AZURE_MAX_RETRY_SECS", "0"),
            (
                "AZURE_STORAGE_CONNECTION_STRING",
                "AccountName=a;AccountKey=k",
            ),
        ]);
        let settings = Settings::resolve_with(&with_data_dir(dir.path()), &env).unwrap();
        let options = settings.azure_options().unwrap();
        assert_eq!(options.submit_visibility, Duration::from_secs(2));
        assert_eq!(options.max_retry, Duration::ZERO);
    }

    #[test]
    fn invalid_azure_submit_settings_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (
                "BGW_AZURE_SUBMIT_VISIBILITY_SECS",
                "soon",
                "invalid BGW_AZURE_SUBMIT_VISIBILITY_SECS \"soon\"",
            ),
            (
                "BGW_AZURE_MAX_RETRY_SECS",
                "-1",
                "invalid BGW_AZURE_MAX_RETRY_SECS \"-1\"",
            ),
            (
                "BGW_AZURE_SUBMIT_VISIBILITY_SECS",
                "0",
                "must be from 1 to 604800, but it is 0",
            ),
            (
                "BGW_AZURE_SUBMIT_VISIBILITY_SECS",
                "604801",
                "but it is 604801",
            ),
        ];
        for (name, value, expected) in cases {
            let env = environment(&[(name, value)]);
            let error = invalid_message(Settings::resolve_with(&with_data_dir(dir.path()), &env));
            assert!(error.contains(expected), "{name}={value}: {error}");
        }
    }

    #[test]
    fn sqlite_options_follow_settings() {
        let env = environment(&[
            ("BGW_DATA_DIR", "/data"),
            ("ACTIVE_TABLE_NAME", "A1"),
            ("FINISHED_TABLE_NAME", "F1"),
            ("BGW_QUEUE", "q-one"),
        ]);
        let settings = Settings::resolve_with(&Overrides::default(), &env).unwrap();
        let options = settings.sqlite_options();
        assert_eq!(options.db_path, PathBuf::from("/data/bgw.db"));
        assert_eq!(options.blob_dir, PathBuf::from("/data/blobs"));
        assert_eq!(options.component_dir, PathBuf::from("/data/components"));
        assert_eq!(options.active_table, "A1");
        assert_eq!(options.finished_table, "F1");
        assert_eq!(options.queue_name, "q-one");
        assert_eq!(options.synchronous, Synchronous::Normal);
    }
}

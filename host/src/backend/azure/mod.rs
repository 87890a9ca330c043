//! The Azure Storage backend: task records in Tables, the task queue in Queues, blobs and
//! component files in Blob Storage.
//!
//! Records and messages use the wire format of `background-workflows` 0.3.0, so its
//! clients and workers can share the tables and the queue with `bgw` (see [`entity`]).
//! Azure has no transaction across a table and a queue, so [`Backend::submit`] is a saga
//! with compensation, and every write made under a lease is fenced twice: the queue
//! proves the lease (only the newest pop receipt can update or delete the message) and
//! the entity's ETag (`If-Match`) keeps two hosts from overwriting each other.
//!
//! Tables, queues and containers are created on first use, so opening the backend does no
//! I/O and works from synchronous code.
//!
//! [`Backend::submit`]: crate::backend::Backend::submit

mod blobs;
mod entity;
mod lifecycle;
mod queue;
mod registry;
mod store;
mod table;

use std::path::PathBuf;
use std::sync::atomic::AtomicU32;
use std::sync::Arc;
use std::time::Duration;

use azure_data_tables::prelude::{TableClient, TableServiceClient};
use azure_storage::{CloudLocation, ConnectionString, StorageCredentials};
use azure_storage_blobs::prelude::BlobServiceClient;
use azure_storage_queues::prelude::{QueueClient, QueueServiceClient};
use tokio::sync::OnceCell;

use self::blobs::AzureBlobStore;
use crate::backend::sqlite::DEFAULT_QUEUE;
use crate::record::{DEFAULT_ACTIVE_TABLE, DEFAULT_FINISHED_TABLE};
use crate::{validate, Error, Result};

/// Container of payloads, results and other values too large for a table property or a
/// queue message.
pub const PAYLOAD_CONTAINER: &str = "bgw-payloads";

/// Container of registered `.wasm` files, named `<digest>.wasm`.
pub const COMPONENT_CONTAINER: &str = "bgw-components";

/// Default table of registered component versions and the registry generation.
pub const COMPONENT_TABLE: &str = "BgwComponents";

/// Table mapping idempotency keys to the task they created, one entity per key and
/// active table.
pub const IDEMPOTENCY_TABLE: &str = "BgwIdempotency";

/// Table of dead letters, partitioned by queue name.
pub const DEAD_LETTER_TABLE: &str = "BgwDeadLetters";

/// Requests that one batch operation (reads, attempt starts, outcomes, message deletes)
/// keeps in flight at once. The service has no batch call that spans partitions and
/// queue messages, so a batch is many requests, and running them one after another let
/// the leases of a batch's later messages expire before they were reached.
const BATCH_CONCURRENCY: usize = 16;

/// Runs futures with at most [`BATCH_CONCURRENCY`] of them at once, returning their outputs
/// in the order given. It takes a `Vec`, not an iterator, because an async trait method's
/// future must be `Send`, which rustc cannot show for a lazy `map` over borrowed items.
async fn concurrently<F: std::future::Future>(futures: Vec<F>) -> Vec<F::Output> {
    use futures::StreamExt;
    futures::stream::iter(futures)
        .buffered(BATCH_CONCURRENCY)
        .collect()
        .await
}

/// Default time a message that `submit` enqueues stays hidden until the submit has stored
/// the task record and made the message visible: 2 min. It outlasts the SDK's retries of
/// one request at the default [`DEFAULT_MAX_RETRY`], which end about 81 s after the first
/// try (`azure_core` 0.21 pauses 0.4 s, doubling up to 30 s, for at most 8 retries). So a
/// submit whose insert was rejected still has the pop receipt that deletes its message.
pub const DEFAULT_SUBMIT_VISIBILITY: Duration = Duration::from_secs(120);

/// Maximum visibility timeout Azure Queues accepts: 7 days.
pub const MAX_SUBMIT_VISIBILITY: Duration = Duration::from_secs(7 * 24 * 3600);

/// Default time the SDK goes on retrying a request that failed transiently: the 60 s of
/// `azure_core` 0.21's exponential retry policy.
pub const DEFAULT_MAX_RETRY: Duration = Duration::from_secs(60);

/// Settings of the Azure backend.
#[derive(Clone)]
pub struct AzureOptions {
    /// An Azure Storage connection string with an account key or a SAS token.
    pub connection_string: String,
    pub active_table: String,
    pub finished_table: String,
    pub queue_name: String,
    /// Table of the component registry. Hosts that share it see each other's
    /// registrations; deployments in one account that need separate registries set
    /// different names.
    pub component_table: String,
    /// Local folder that caches `.wasm` files and keeps compiled artifacts, so that each
    /// host compiles a component once.
    pub component_dir: PathBuf,
    /// Time a message that `submit` enqueues stays hidden until the submit has stored the
    /// task record and made the message visible. A submit that fails after the message
    /// was put and cannot delete it leaves a message that appears after this time and is
    /// dead-lettered.
    pub submit_visibility: Duration,
    /// Time the SDK goes on retrying a request that timed out, was throttled (429), failed
    /// with a 5xx status or an I/O error, before the operation fails.
    pub max_retry: Duration,
}

impl std::fmt::Debug for AzureOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The connection string contains the account key, so it is never printed.
        f.debug_struct("AzureOptions")
            .field("active_table", &self.active_table)
            .field("finished_table", &self.finished_table)
            .field("queue_name", &self.queue_name)
            .field("component_table", &self.component_table)
            .field("component_dir", &self.component_dir)
            .field("submit_visibility", &self.submit_visibility)
            .field("max_retry", &self.max_retry)
            .finish_non_exhaustive()
    }
}

impl AzureOptions {
    /// Options with the default table and queue names.
    pub fn new(connection_string: impl Into<String>, component_dir: impl Into<PathBuf>) -> Self {
        AzureOptions {
            connection_string: connection_string.into(),
            active_table: DEFAULT_ACTIVE_TABLE.to_owned(),
            finished_table: DEFAULT_FINISHED_TABLE.to_owned(),
            queue_name: DEFAULT_QUEUE.to_owned(),
            component_table: COMPONENT_TABLE.to_owned(),
            component_dir: component_dir.into(),
            submit_visibility: DEFAULT_SUBMIT_VISIBILITY,
            max_retry: DEFAULT_MAX_RETRY,
        }
    }
}

/// Task store, queue, blob store and component registry in one Azure Storage account.
pub struct AzureBackend {
    shared: Arc<Shared>,
    blobs: AzureBlobStore,
}

/// Clients and names that the operations use.
struct Shared {
    active_name: String,
    finished_name: String,
    queue_name: String,
    active: TableClient,
    finished: TableClient,
    components: TableClient,
    idempotency: TableClient,
    dead_letters: TableClient,
    queue: QueueClient,
    blob_service: BlobServiceClient,
    component_dir: PathBuf,
    /// See [`AzureOptions::submit_visibility`].
    submit_visibility: Duration,
    /// See [`AzureOptions::max_retry`].
    max_retry: Duration,
    /// Set once the tables, the queue and the containers exist.
    created: OnceCell<()>,
    /// Leases in a row that found the queue empty, for the polling backoff.
    empty_polls: AtomicU32,
}

impl AzureBackend {
    /// Checks the names and parses the connection string. Creates no resource: tables,
    /// the queue and the containers are created by the first operation that needs them.
    pub fn open(options: AzureOptions) -> Result<Self> {
        validate::backend_names(
            &options.active_table,
            &options.finished_table,
            &options.queue_name,
        )?;
        validate::table_name(&options.component_table)?;

        let endpoints = Endpoints::parse(&options.connection_string, options.max_retry)?;
        let tables = TableServiceClient::new_with_location(&endpoints);
        let queues = QueueServiceClient::new_with_location(&endpoints);
        // Two blob clients: the async operations use one on the caller's runtime, and the
        // synchronous BlobStore uses the other on its own runtime, because a connection
        // pool must not outlive the runtime that opened its connections.
        let blob_service = BlobServiceClient::new_with_location(&endpoints);
        let blob_store_service = BlobServiceClient::new_with_location(&endpoints);

        let shared = Shared {
            active: tables.table_client(&options.active_table),
            finished: tables.table_client(&options.finished_table),
            components: tables.table_client(&options.component_table),
            idempotency: tables.table_client(IDEMPOTENCY_TABLE),
            dead_letters: tables.table_client(DEAD_LETTER_TABLE),
            queue: queues.queue_client(&options.queue_name),
            blob_service,
            active_name: options.active_table,
            finished_name: options.finished_table,
            queue_name: options.queue_name,
            component_dir: options.component_dir,
            submit_visibility: options.submit_visibility,
            max_retry: options.max_retry,
            created: OnceCell::new(),
            empty_polls: AtomicU32::new(0),
        };
        Ok(AzureBackend {
            shared: Arc::new(shared),
            blobs: AzureBlobStore::new(blob_store_service)?,
        })
    }

    /// Returns the shared state after creating the tables, the queue and the containers
    /// if this backend has not done so yet.
    async fn ready(&self) -> Result<&Shared> {
        let shared = &*self.shared;
        shared
            .created
            .get_or_try_init(|| create_resources(shared))
            .await?;
        Ok(shared)
    }
}

/// Creates every table, the queue and the containers; an existing one is not an error.
async fn create_resources(shared: &Shared) -> Result<()> {
    let tables = [
        &shared.active,
        &shared.finished,
        &shared.components,
        &shared.idempotency,
        &shared.dead_letters,
    ];
    for table in tables {
        match table.create().await {
            Ok(_) => tracing::info!(table = table.table_name(), "created Azure table"),
            Err(error) if status_of(&error) == Some(409) => {}
            Err(error) => {
                return Err(azure_error(
                    format!("failed to create table {}", table.table_name()),
                    error,
                ))
            }
        }
    }
    match shared.queue.create().await {
        Ok(_) => {}
        Err(error) if status_of(&error) == Some(409) => {}
        Err(error) => {
            return Err(azure_error(
                format!("failed to create queue {}", shared.queue_name),
                error,
            ))
        }
    }
    for container in [PAYLOAD_CONTAINER, COMPONENT_CONTAINER] {
        blobs::create_container(&shared.blob_service, container).await?;
    }
    Ok(())
}

/// Service endpoints and credentials read from a connection string, and the retry policy
/// of every client.
struct Endpoints {
    credentials: StorageCredentials,
    table: CloudLocation,
    queue: CloudLocation,
    blob: CloudLocation,
    retry: azure_core::RetryOptions,
}

impl Endpoints {
    /// Parses a connection string. Explicit `TableEndpoint`, `QueueEndpoint` and
    /// `BlobEndpoint` values win; `UseDevelopmentStorage=true` selects Azurite on its
    /// default ports; otherwise the public cloud endpoints of the account are used.
    /// Requests are retried with the SDK's exponential backoff for at most `max_retry`.
    fn parse(text: &str, max_retry: Duration) -> Result<Self> {
        let invalid = |detail: String| {
            Error::Invalid(format!(
                "invalid AZURE_STORAGE_CONNECTION_STRING: {detail}; expected \
                 'AccountName=...;AccountKey=...' with optional TableEndpoint, QueueEndpoint \
                 and BlobEndpoint"
            ))
        };
        let parsed = ConnectionString::new(text).map_err(|error| invalid(error.to_string()))?;
        let development = parsed.use_development_storage == Some(true);
        let credentials = match development && parsed.account_key.is_none() {
            true => StorageCredentials::emulator(),
            false => parsed
                .storage_credentials()
                .map_err(|error| invalid(error.to_string()))?,
        };
        let account = match (parsed.account_name, development) {
            (Some(name), _) => name.to_owned(),
            (None, true) => azure_storage::EMULATOR_ACCOUNT.to_owned(),
            (None, false) => return Err(invalid("AccountName is missing".to_owned())),
        };
        let location = |endpoint: Option<&str>, port: u16| match endpoint {
            Some(uri) => CloudLocation::Custom {
                account: account.clone(),
                uri: uri.trim_end_matches('/').to_owned(),
            },
            None if development => CloudLocation::Emulator {
                address: "127.0.0.1".to_owned(),
                port,
            },
            None => CloudLocation::Public {
                account: account.clone(),
            },
        };
        Ok(Endpoints {
            table: location(parsed.table_endpoint, 10002),
            queue: location(parsed.queue_endpoint, 10001),
            blob: location(parsed.blob_endpoint, 10000),
            credentials,
            retry: azure_core::RetryOptions::exponential(
                azure_core::ExponentialRetryOptions::default().max_total_elapsed(max_retry),
            ),
        })
    }
}

/// Builds a service client from the parsed endpoints.
trait FromEndpoints {
    fn new_with_location(endpoints: &Endpoints) -> Self;
}

impl FromEndpoints for TableServiceClient {
    fn new_with_location(endpoints: &Endpoints) -> Self {
        azure_data_tables::clients::TableServiceClientBuilder::with_location(
            endpoints.table.clone(),
            endpoints.credentials.clone(),
        )
        .retry(endpoints.retry.clone())
        .build()
    }
}

impl FromEndpoints for QueueServiceClient {
    fn new_with_location(endpoints: &Endpoints) -> Self {
        azure_storage_queues::QueueServiceClientBuilder::with_location(
            endpoints.queue.clone(),
            endpoints.credentials.clone(),
        )
        .retry(endpoints.retry.clone())
        .build()
    }
}

impl FromEndpoints for BlobServiceClient {
    fn new_with_location(endpoints: &Endpoints) -> Self {
        azure_storage_blobs::prelude::ClientBuilder::with_location(
            endpoints.blob.clone(),
            endpoints.credentials.clone(),
        )
        .retry(endpoints.retry.clone())
        .blob_service_client()
    }
}

/// Returns the HTTP status of a failed Azure request, if the service responded.
fn status_of(error: &azure_core::Error) -> Option<u16> {
    match error.kind() {
        azure_core::error::ErrorKind::HttpResponse { status, .. } => Some(u16::from(*status)),
        _ => None,
    }
}

/// Wraps an Azure SDK error with what was being done. An error response becomes one line
/// with its status, error code and message, followed by the SDK's own message, which shows
/// whether the request was retried. The SDK's error would print the whole response twice.
fn azure_error(context: impl Into<String>, error: azure_core::Error) -> Error {
    let context = context.into();
    let Some(response) = error.as_http_error() else {
        return Error::Other(anyhow::Error::new(error).context(context));
    };
    let code = response.error_code().unwrap_or("no error code");
    let message = response
        .error_message()
        .map(|message| format!(": {message}"))
        .unwrap_or_default();
    Error::Other(anyhow::anyhow!(
        "{context}: HTTP {} {code}{message} ({error})",
        u16::from(response.status())
    ))
}

/// Quotes a value for an OData filter or an entity key: single quotes are doubled.
fn odata_quote(value: &str) -> String {
    value.replace('\'', "''")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_string_with_endpoints_is_parsed() {
        let text = "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;\
            AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;\
            BlobEndpoint=http://127.0.0.1:1/devstoreaccount1;\
            QueueEndpoint=http://127.0.0.1:2/devstoreaccount1;\
            TableEndpoint=http://127.0.0.1:3/devstoreaccount1;";
        let endpoints = Endpoints::parse(text, DEFAULT_MAX_RETRY).unwrap();
        let url = endpoints
            .queue
            .url(azure_storage::clients::ServiceType::Queue)
            .unwrap();
        assert_eq!(url.as_str(), "http://127.0.0.1:2/devstoreaccount1");
    }

    #[test]
    fn connection_string_without_account_is_rejected() {
        let error = Endpoints::parse("AccountKey=abc", DEFAULT_MAX_RETRY)
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("AZURE_STORAGE_CONNECTION_STRING"), "{error}");
    }

    #[test]
    fn debug_output_hides_the_connection_string() {
        let options = AzureOptions::new("AccountName=a;AccountKey=secret", "/tmp/unused");
        assert!(!format!("{options:?}").contains("secret"));
    }
}

//! The synchronous [`BlobStore`] over Azure Blob Storage.
//!
//! [`BlobStore`] is synchronous because the sandbox reads and writes blobs from inside
//! guest calls. Each call runs its request on a small runtime owned by this store and
//! blocks the calling thread until it completes. The store's own runtime is used, not the
//! caller's, because blocking on the caller's runtime from one of its threads deadlocks or
//! panics.

use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::sync::mpsc;

use azure_storage_blobs::prelude::BlobServiceClient;

use super::{azure_error, status_of};
use crate::backend::{BlobRef, BlobStore, BlobWriter, ReadAt};
use crate::blob::validate_blob_name;
use crate::{validate, Error, Result};

/// Blobs in Azure Blob Storage. Containers are created when the first blob is stored.
pub(super) struct AzureBlobStore {
    service: BlobServiceClient,
    runtime: Runtime,
}

impl AzureBlobStore {
    pub(super) fn new(service: BlobServiceClient) -> Result<Self> {
        Ok(AzureBlobStore {
            service,
            runtime: Runtime::new()?,
        })
    }
}

impl BlobStore for AzureBlobStore {
    fn put(&self, blob: &BlobRef, data: &mut dyn Read) -> Result<u64> {
        check(blob)?;
        let mut bytes = Vec::new();
        data.read_to_end(&mut bytes).map_err(|error| {
            Error::io(
                format!("failed to read the data of blob {}", describe(blob)),
                error,
            )
        })?;
        let size = bytes.len() as u64;
        let (service, blob) = (self.service.clone(), blob.clone());
        self.runtime
            .run(async move { upload(&service, &blob, bytes).await })?;
        Ok(size)
    }

    /// NOTE: downloads the whole blob into memory, so a blob must fit in RAM.
    fn open(&self, blob: &BlobRef) -> Result<(Box<dyn ReadAt>, u64)> {
        check(blob)?;
        let (service, target) = (self.service.clone(), blob.clone());
        let bytes = self.runtime.run(async move {
            service
                .container_client(&target.container)
                .blob_client(&target.name)
                .get_content()
                .await
                .map_err(|error| match status_of(&error) {
                    Some(404) => not_found(&target),
                    _ => azure_error(
                        format!("failed to download blob {}", describe(&target)),
                        error,
                    ),
                })
        })?;
        let size = bytes.len() as u64;
        Ok((Box::new(MemoryReader(bytes)), size))
    }

    /// NOTE: the writer buffers the blob in memory until `commit` uploads it.
    fn create(&self, blob: &BlobRef) -> Result<Box<dyn BlobWriter>> {
        check(blob)?;
        Ok(Box::new(AzureBlobWriter {
            buffer: Vec::new(),
            blob: blob.clone(),
            service: self.service.clone(),
            runtime: self.runtime.handle(),
        }))
    }

    fn delete(&self, blob: &BlobRef) -> Result<()> {
        check(blob)?;
        let (service, target) = (self.service.clone(), blob.clone());
        self.runtime.run(async move {
            let result = service
                .container_client(&target.container)
                .blob_client(&target.name)
                .delete()
                .await;
            match result {
                Ok(_) => Ok(()),
                Err(error) if status_of(&error) == Some(404) => Ok(()),
                Err(error) => Err(azure_error(
                    format!("failed to delete blob {}", describe(&target)),
                    error,
                )),
            }
        })
    }

    fn local_path(&self, _blob: &BlobRef) -> Option<PathBuf> {
        None
    }
}

/// Creates a container; an existing one is not an error.
pub(super) async fn create_container(service: &BlobServiceClient, container: &str) -> Result<()> {
    match service.container_client(container).create().await {
        Ok(_) => Ok(()),
        Err(error) if status_of(&error) == Some(409) => Ok(()),
        Err(error) => Err(azure_error(
            format!("failed to create blob container {container}"),
            error,
        )),
    }
}

/// Uploads a whole blob, creating its container when it does not exist yet.
async fn upload(service: &BlobServiceClient, blob: &BlobRef, bytes: Vec<u8>) -> Result<()> {
    let client = service
        .container_client(&blob.container)
        .blob_client(&blob.name);
    let first = client.put_block_blob(bytes.clone()).await;
    let error = match first {
        Ok(_) => return Ok(()),
        Err(error) if status_of(&error) == Some(404) => error,
        Err(error) => {
            return Err(azure_error(
                format!("failed to upload blob {}", describe(blob)),
                error,
            ))
        }
    };
    tracing::debug!(container = %blob.container, %error, "creating missing blob container");
    create_container(service, &blob.container).await?;
    client
        .put_block_blob(bytes)
        .await
        .map_err(|error| azure_error(format!("failed to upload blob {}", describe(blob)), error))?;
    Ok(())
}

fn check(blob: &BlobRef) -> Result<()> {
    validate::azure_name("container name", &blob.container)?;
    validate_blob_name(&blob.name)
}

fn describe(blob: &BlobRef) -> String {
    format!("{:?} in container {:?}", blob.name, blob.container)
}

fn not_found(blob: &BlobRef) -> Error {
    Error::NotFound(format!("blob {} not found", describe(blob)))
}

/// A runtime for the blob requests, shut down without waiting when the store is dropped,
/// because dropping a runtime the normal way panics inside another runtime.
struct Runtime(Option<tokio::runtime::Runtime>);

impl Runtime {
    fn new() -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("bgw-azure-blobs")
            .enable_all()
            .build()
            .map_err(|error| Error::io("failed to start the Azure blob runtime", error))?;
        Ok(Runtime(Some(runtime)))
    }

    fn handle(&self) -> tokio::runtime::Handle {
        self.0
            .as_ref()
            .expect("runtime lives until drop")
            .handle()
            .clone()
    }

    fn run<T, F>(&self, future: F) -> Result<T>
    where
        T: Send + 'static,
        F: std::future::Future<Output = Result<T>> + Send + 'static,
    {
        run_on(&self.handle(), future)
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// Runs a future on `handle` and blocks this thread until it completes.
fn run_on<T, F>(handle: &tokio::runtime::Handle, future: F) -> Result<T>
where
    T: Send + 'static,
    F: std::future::Future<Output = Result<T>> + Send + 'static,
{
    let (sender, receiver) = mpsc::sync_channel(1);
    handle.spawn(async move {
        let _ = sender.send(future.await);
    });
    receiver.recv().unwrap_or_else(|_| {
        Err(Error::Other(anyhow::anyhow!(
            "the Azure blob runtime stopped before the request completed"
        )))
    })
}

struct MemoryReader(Vec<u8>);

impl ReadAt for MemoryReader {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(self.0.len());
        let count = buf.len().min(self.0.len() - start);
        buf[..count].copy_from_slice(&self.0[start..start + count]);
        Ok(count)
    }
}

struct AzureBlobWriter {
    buffer: Vec<u8>,
    blob: BlobRef,
    service: BlobServiceClient,
    runtime: tokio::runtime::Handle,
}

impl Write for AzureBlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.buffer.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl BlobWriter for AzureBlobWriter {
    fn commit(self: Box<Self>) -> Result<()> {
        let AzureBlobWriter {
            buffer,
            blob,
            service,
            runtime,
        } = *self;
        run_on(
            &runtime,
            async move { upload(&service, &blob, buffer).await },
        )
    }
}

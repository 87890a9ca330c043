//! Blobs as files in a local folder: `<root>/<container>/<name>`.
//!
//! Container names follow the Azure rules and blob names are checked so that no name can
//! leave its container. Writes go to a temporary file under `<root>/.tmp/` and are renamed
//! into place on commit, so a reader never sees a partly written blob. A writer holds an
//! exclusive lock on its temporary file, which distinguishes a file whose process ended
//! from one still being written.

use std::fs::{self, File, TryLockError};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::backend::{BlobRef, BlobStore, BlobWriter, ReadAt};
use crate::validate::{self, describe_char, quote};
use crate::{Error, Result};

/// Maximum length of a blob name, in characters, as in Azure Blob Storage.
pub const MAX_BLOB_NAME_CHARS: usize = 1024;

/// Folder under the root for blobs being written. Its name starts with a dot, which no
/// container name can, so it never collides with a container.
const TEMP_DIR: &str = ".tmp";

/// Extension of the temporary file of a blob being written.
const TEMP_EXTENSION: &str = "part";

/// Time since its last change after which an unlocked temporary file counts as left by a
/// process that ended. The lock alone would do on a local file system. The age also
/// covers the moment between a file's creation and its lock, and file systems that
/// accept a lock without enforcing it between hosts.
pub const STALE_TEMP_AGE: Duration = Duration::from_secs(3600);

/// Files that [`LocalBlobStore::remove_stale_temp_files`] deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RemovedTempFiles {
    pub files: usize,
    pub bytes: u64,
}

/// A [`BlobStore`] that keeps each blob as a file under `root`.
#[derive(Clone, Debug)]
pub struct LocalBlobStore {
    root: PathBuf,
}

impl LocalBlobStore {
    /// Creates a store rooted at `root`. Folders are created when the first blob is written.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        LocalBlobStore { root: root.into() }
    }

    /// Returns the root folder, which contains the containers.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Returns the path of a blob after checking its container and name.
    pub fn path_of(&self, blob: &BlobRef) -> Result<PathBuf> {
        validate::azure_name("container name", &blob.container)?;
        validate_blob_name(&blob.name)?;
        Ok(self.root.join(&blob.container).join(&blob.name))
    }

    /// Deletes the temporary files of blobs whose writers ended without committing or
    /// removing them, such as a `bgw submit` stopped by SIGINT or a killed daemon. A file
    /// counts as such when no process holds its lock and it has not changed for
    /// [`STALE_TEMP_AGE`]. A file whose lock cannot be tested is kept.
    pub fn remove_stale_temp_files(&self) -> Result<RemovedTempFiles> {
        let temp_dir = self.root.join(TEMP_DIR);
        let entries = match fs::read_dir(&temp_dir) {
            Ok(entries) => entries,
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                return Ok(RemovedTempFiles::default())
            }
            Err(error) => {
                let context = format!("failed to list {}", temp_dir.display());
                return Err(Error::io(context, error));
            }
        };

        let mut removed = RemovedTempFiles::default();
        for entry in entries {
            let path = match entry {
                Ok(entry) => entry.path(),
                Err(error) => {
                    let context = format!("failed to list {}", temp_dir.display());
                    return Err(Error::io(context, error));
                }
            };
            if path
                .extension()
                .is_none_or(|extension| extension != TEMP_EXTENSION)
            {
                continue;
            }
            match remove_if_stale(&path) {
                Ok(Some(bytes)) => {
                    removed.files += 1;
                    removed.bytes += bytes;
                }
                Ok(None) => {}
                // Committed or removed by its writer since the listing.
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(error) => {
                    let context = format!("failed to remove stale blob file {}", path.display());
                    return Err(Error::io(context, error));
                }
            }
        }
        Ok(removed)
    }
}

/// Deletes a temporary blob file that is unlocked and older than [`STALE_TEMP_AGE`], and
/// returns its size, or `None` when the file is kept.
fn remove_if_stale(path: &Path) -> io::Result<Option<u64>> {
    let metadata = fs::symlink_metadata(path)?;
    let unchanged_for = SystemTime::now()
        .duration_since(metadata.modified()?)
        .unwrap_or_default();
    if !metadata.is_file() || unchanged_for < STALE_TEMP_AGE {
        return Ok(None);
    }

    let file = File::open(path)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => return Ok(None),
        Err(TryLockError::Error(error)) => {
            tracing::debug!(path = %path.display(), %error, "cannot lock a temporary blob file, so it is kept");
            return Ok(None);
        }
    }
    // The lock is held until `file` is dropped, after the removal.
    fs::remove_file(path)?;
    Ok(Some(metadata.len()))
}

impl BlobStore for LocalBlobStore {
    fn put(&self, blob: &BlobRef, data: &mut dyn Read) -> Result<u64> {
        let mut writer = self.create(blob)?;
        // A plain loop in place of `io::copy`, so that the error names the side that failed.
        let mut buffer = vec![0; 64 * 1024];
        let mut size = 0;
        loop {
            let read = match data.read(&mut buffer) {
                Ok(0) => break,
                Ok(read) => read,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    let context = format!("failed to read the data of blob {}", describe(blob));
                    return Err(Error::io(context, error));
                }
            };
            writer.write_all(&buffer[..read]).map_err(|error| {
                Error::io(format!("failed to write blob {}", describe(blob)), error)
            })?;
            size += read as u64;
        }
        writer.commit()?;
        Ok(size)
    }

    fn open(&self, blob: &BlobRef) -> Result<(Box<dyn ReadAt>, u64)> {
        let path = self.path_of(blob)?;
        let file = File::open(&path).map_err(|error| match error.kind() {
            io::ErrorKind::NotFound => not_found(blob),
            _ => Error::io(format!("failed to open blob {}", describe(blob)), error),
        })?;
        let metadata = file.metadata().map_err(|error| {
            Error::io(format!("failed to read size of {}", path.display()), error)
        })?;
        if !metadata.is_file() {
            return Err(not_found(blob));
        }
        Ok((Box::new(FileReader(file)), metadata.len()))
    }

    fn create(&self, blob: &BlobRef) -> Result<Box<dyn BlobWriter>> {
        let destination = self.path_of(blob)?;
        let temp_dir = self.root.join(TEMP_DIR);
        fs::create_dir_all(&temp_dir).map_err(|error| {
            Error::io(format!("failed to create {}", temp_dir.display()), error)
        })?;

        let temp_path = temp_dir.join(format!("{}.{TEMP_EXTENSION}", uuid::Uuid::new_v4()));
        let file = File::create_new(&temp_path).map_err(|error| {
            Error::io(format!("failed to create {}", temp_path.display()), error)
        })?;
        // The lock lasts until the file is closed, which the kernel also does when the
        // process ends.
        if let Err(error) = file.try_lock() {
            tracing::debug!(path = %temp_path.display(), %error, "failed to lock a temporary blob file");
        }
        Ok(Box::new(LocalBlobWriter {
            file,
            temp_path: Some(temp_path),
            destination,
        }))
    }

    fn delete(&self, blob: &BlobRef) -> Result<()> {
        let path = self.path_of(blob)?;
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(error) => {
                return Err(Error::io(
                    format!("failed to delete blob {}", describe(blob)),
                    error,
                ))
            }
        }
        // Remove the folders of the name that are now empty, so that pruning leaves none
        // behind. `remove_dir` fails on a folder that still has entries, which ends the walk.
        let container = self.root.join(&blob.container);
        let mut folder = path.parent();
        while let Some(current) = folder.filter(|current| *current != container) {
            if fs::remove_dir(current).is_err() {
                break;
            }
            folder = current.parent();
        }
        Ok(())
    }

    fn local_path(&self, blob: &BlobRef) -> Option<PathBuf> {
        self.path_of(blob).ok()
    }
}

/// Checks a blob name: 1 to 1024 characters, no control characters, no backslash, no
/// leading `/`, and no empty, `.` or `..` segment between slashes.
pub fn validate_blob_name(name: &str) -> Result<()> {
    let length = name.chars().count();
    let rule = if length == 0 {
        "it must not be empty".to_owned()
    } else if length > MAX_BLOB_NAME_CHARS {
        format!("it is {length} characters long; the maximum is {MAX_BLOB_NAME_CHARS}")
    } else if let Some((index, ch)) = name.chars().enumerate().find(|&(_, ch)| forbidden(ch)) {
        format!(
            "it contains {} at character index {index}; control characters and '\\' are \
             not allowed",
            describe_char(ch)
        )
    } else if name.starts_with('/') {
        "it starts with '/'; a blob name is relative to its container".to_owned()
    } else if let Some(segment) = name.split('/').find(|s| matches!(*s, "" | "." | "..")) {
        format!(
            "it has the path segment {segment:?}; empty, \".\" and \"..\" segments are not \
             allowed, so that a name cannot leave its container"
        )
    } else {
        return Ok(());
    };
    Err(Error::Invalid(format!(
        "invalid blob name {}: {rule}",
        quote(name)
    )))
}

fn forbidden(ch: char) -> bool {
    ch == '\\' || validate::is_control(ch)
}

fn describe(blob: &BlobRef) -> String {
    format!("{:?} in container {:?}", blob.name, blob.container)
}

fn not_found(blob: &BlobRef) -> Error {
    Error::NotFound(format!("blob {} not found", describe(blob)))
}

struct FileReader(File);

impl ReadAt for FileReader {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read_at(buf, offset)
    }
}

/// A blob being written to a temporary file. Dropping it without `commit` removes the file.
struct LocalBlobWriter {
    file: File,
    /// `None` once the file has been renamed into place.
    temp_path: Option<PathBuf>,
    destination: PathBuf,
}

impl Write for LocalBlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl BlobWriter for LocalBlobWriter {
    fn commit(mut self: Box<Self>) -> Result<()> {
        let temp_path = self
            .temp_path
            .clone()
            .expect("a writer is committed at most once");
        let destination = self.destination.clone();

        // The data reaches the disk before the rename makes it visible, so a crash leaves
        // either the old blob or the whole new one.
        self.file
            .sync_all()
            .map_err(|error| Error::io(format!("failed to sync {}", temp_path.display()), error))?;
        let mut renamed = Err(io::Error::from(io::ErrorKind::NotFound));
        // A delete of another blob in the same folder may remove the folder between its
        // creation and the rename, so a missing folder is created again, up to three times.
        for _ in 0..3 {
            if let Some(parent) = destination.parent() {
                fs::create_dir_all(parent).map_err(|error| {
                    Error::io(format!("failed to create {}", parent.display()), error)
                })?;
            }
            renamed = fs::rename(&temp_path, &destination);
            if !matches!(&renamed, Err(error) if error.kind() == io::ErrorKind::NotFound) {
                break;
            }
        }
        renamed.map_err(|error| {
            let context = format!(
                "failed to move blob into place at {}",
                destination.display()
            );
            Error::io(context, error)
        })?;
        self.temp_path = None;
        Ok(())
    }
}

impl Drop for LocalBlobWriter {
    fn drop(&mut self) {
        if let Some(path) = self.temp_path.take() {
            if let Err(error) = fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), %error, "failed to remove unfinished blob");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(container: &str, name: &str) -> BlobRef {
        BlobRef {
            container: container.to_owned(),
            name: name.to_owned(),
        }
    }

    fn invalid_message(result: Result<impl std::fmt::Debug>) -> String {
        match result {
            Err(Error::Invalid(message)) => message,
            other => panic!("expected Error::Invalid, got {other:?}"),
        }
    }

    fn read_all(store: &LocalBlobStore, target: &BlobRef) -> Vec<u8> {
        let (reader, size) = store.open(target).unwrap();
        let mut data = vec![0; size as usize];
        assert_eq!(reader.read_at(0, &mut data).unwrap(), size as usize);
        data
    }

    fn temp_files(store: &LocalBlobStore) -> usize {
        match fs::read_dir(store.root().join(TEMP_DIR)) {
            Ok(entries) => entries.count(),
            Err(_) => 0,
        }
    }

    #[test]
    fn put_then_open_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalBlobStore::new(dir.path());
        let target = blob("inputs", "task-1/input.bin");

        let size = store.put(&target, &mut &b"hello blob"[..]).unwrap();
        assert_eq!(size, 10);
        assert_eq!(read_all(&store, &target), b"hello blob");
        assert_eq!(
            store.local_path(&target).unwrap(),
            dir.path().join("inputs/task-1/input.bin")
        );
    }

    #[test]
    fn put_names_a_failed_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalBlobStore::new(dir.path());
        let target = blob("inputs", "task-1/input");
        let mut source = File::open(dir.path()).unwrap();

        let error = store.put(&target, &mut source).unwrap_err().to_string();
        assert!(
            error.starts_with("failed to read the data of blob \"task-1/input\""),
            "{error}"
        );
        assert!(store.open(&target).is_err(), "no blob is left behind");
    }

    #[test]
    fn read_at_reads_from_offset() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalBlobStore::new(dir.path());
        let target = blob("inputs", "data");
        store.put(&target, &mut &b"0123456789"[..]).unwrap();

        let (reader, _) = store.open(&target).unwrap();
        let mut buf = [0u8; 4];
        assert_eq!(reader.read_at(6, &mut buf).unwrap(), 4);
        assert_eq!(&buf, b"6789");
        assert_eq!(reader.read_at(10, &mut buf).unwrap(), 0);
    }

    #[test]
    fn put_replaces_existing_blob() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalBlobStore::new(dir.path());
        let target = blob("inputs", "data");
        store.put(&target, &mut &b"first version"[..]).unwrap();
        store.put(&target, &mut &b"second"[..]).unwrap();
        assert_eq!(read_all(&store, &target), b"second");
    }

    #[test]
    fn blob_invisible_until_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalBlobStore::new(dir.path());
        let target = blob("outputs", "result.json");

        let mut writer = store.create(&target).unwrap();
        writer.write_all(b"{}").unwrap();
        assert!(matches!(store.open(&target), Err(Error::NotFound(_))));
        assert_eq!(temp_files(&store), 1);

        writer.commit().unwrap();
        assert_eq!(read_all(&store, &target), b"{}");
        assert_eq!(temp_files(&store), 0);
    }

    #[test]
    fn dropped_writer_removes_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalBlobStore::new(dir.path());
        let target = blob("outputs", "result.json");

        let mut writer = store.create(&target).unwrap();
        writer.write_all(b"partial").unwrap();
        assert_eq!(temp_files(&store), 1);
        drop(writer);

        assert_eq!(temp_files(&store), 0);
        assert!(matches!(store.open(&target), Err(Error::NotFound(_))));
    }

    /// Writes a temporary blob file as a writer that ended would leave it, last changed
    /// `age` ago.
    fn left_temp_file(store: &LocalBlobStore, name: &str, size: usize, age: Duration) -> PathBuf {
        let temp_dir = store.root().join(TEMP_DIR);
        fs::create_dir_all(&temp_dir).unwrap();
        let path = temp_dir.join(name);
        fs::write(&path, vec![b'p'; size]).unwrap();
        set_age(&path, age);
        path
    }

    fn set_age(path: &Path, age: Duration) {
        let file = File::options().write(true).open(path).unwrap();
        file.set_modified(SystemTime::now() - age).unwrap();
    }

    #[test]
    fn stale_temp_files_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalBlobStore::new(dir.path());
        let two_hours = Duration::from_secs(2 * 3600);
        let stale = left_temp_file(&store, "a.part", 1000, two_hours);
        let young = left_temp_file(&store, "b.part", 10, Duration::from_secs(60));
        let other = left_temp_file(&store, "notes.txt", 10, two_hours);

        let removed = store.remove_stale_temp_files().unwrap();

        assert_eq!(
            removed,
            RemovedTempFiles {
                files: 1,
                bytes: 1000
            }
        );
        assert!(!stale.exists(), "an old unlocked file is removed");
        assert!(young.exists(), "a file changed within the hour is kept");
        assert!(other.exists(), "a file that is no blob's is kept");
    }

    #[test]
    fn live_writer_keeps_old_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalBlobStore::new(dir.path());
        let target = blob("outputs", "slow");
        let mut writer = store.create(&target).unwrap();
        writer.write_all(b"written an hour ago").unwrap();
        let temp_path = fs::read_dir(store.root().join(TEMP_DIR))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        set_age(&temp_path, Duration::from_secs(2 * 3600));

        let removed = store.remove_stale_temp_files().unwrap();

        assert_eq!(removed, RemovedTempFiles::default());
        assert!(temp_path.exists(), "the writer's lock keeps its file");
        writer.commit().unwrap();
        assert_eq!(read_all(&store, &target), b"written an hour ago");
    }

    #[test]
    fn missing_temp_folder_removes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalBlobStore::new(dir.path().join("never-written"));
        let removed = store.remove_stale_temp_files().unwrap();
        assert_eq!(removed, RemovedTempFiles::default());
    }

    #[test]
    fn missing_blob_names_container_and_name() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalBlobStore::new(dir.path());
        match store.open(&blob("inputs", "nothing-here")) {
            Err(Error::NotFound(message)) => {
                assert!(message.contains("\"nothing-here\""), "{message}");
                assert!(message.contains("\"inputs\""), "{message}");
            }
            other => panic!("expected NotFound, got {:?}", other.map(|(_, size)| size)),
        }
    }

    #[test]
    fn delete_missing_blob_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalBlobStore::new(dir.path());
        let target = blob("inputs", "data");
        store.delete(&target).unwrap();

        store.put(&target, &mut &b"x"[..]).unwrap();
        store.delete(&target).unwrap();
        assert!(matches!(store.open(&target), Err(Error::NotFound(_))));
    }

    #[test]
    fn delete_removes_emptied_folders() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalBlobStore::new(dir.path());
        let remaining = blob("inputs", "a/kept");
        let deleted = blob("inputs", "a/b/c/deleted");
        store.put(&remaining, &mut &b"x"[..]).unwrap();
        store.put(&deleted, &mut &b"y"[..]).unwrap();

        store.delete(&deleted).unwrap();

        assert!(!dir.path().join("inputs/a/b").exists());
        assert!(dir.path().join("inputs/a/kept").is_file());
        store.delete(&remaining).unwrap();
        assert!(!dir.path().join("inputs/a").exists());
        assert!(dir.path().join("inputs").is_dir());
    }

    #[test]
    fn container_rules_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalBlobStore::new(dir.path());
        for container in [
            "ab", "Inputs", "in_puts", "-inputs", "inputs-", "in--puts", ".tmp", "..",
        ] {
            let error = invalid_message(store.put(&blob(container, "x"), &mut &b""[..]));
            assert!(error.contains(&format!("{container:?}")), "{error}");
            assert!(error.contains("container name"), "{error}");
        }
        for container in ["abc", "in-puts", "a1b2", &"a".repeat(63)] {
            assert!(
                store.path_of(&blob(container, "x")).is_ok(),
                "{container:?}"
            );
        }
    }

    #[test]
    fn blob_name_rules_are_checked() {
        let long = "a".repeat(MAX_BLOB_NAME_CHARS + 1);
        let cases = [
            ("", "must not be empty"),
            (long.as_str(), "the maximum is 1024"),
            ("a\u{1}b", "U+0001"),
            ("a\u{7f}b", "U+007F"),
            ("a\u{9f}b", "U+009F"),
            ("a/", "segment \"\""),
            ("a//b", "segment \"\""),
            ("./a", "segment \".\""),
        ];
        for (name, expected) in cases {
            let error = invalid_message(validate_blob_name(name));
            assert!(error.contains(expected), "{name:?}: {error}");
        }
        let longest = "a".repeat(MAX_BLOB_NAME_CHARS);
        for name in [
            "a",
            "dir/file.txt",
            "a.b/c..d/...",
            "日本/語",
            longest.as_str(),
        ] {
            assert!(validate_blob_name(name).is_ok(), "{name:?}");
        }
    }

    #[test]
    fn escape_attempts_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalBlobStore::new(dir.path().join("root"));
        let cases = [
            ("../x", "segment \"..\""),
            ("a/../../x", "segment \"..\""),
            ("/etc/passwd", "starts with '/'"),
            ("a\0b", "U+0000"),
            ("a\\b", "U+005C"),
            ("..", "segment \"..\""),
        ];
        for (name, expected) in cases {
            let target = blob("inputs", name);
            let error = invalid_message(store.put(&target, &mut &b"escaped"[..]));
            assert!(error.contains(expected), "{name:?}: {error}");
            assert!(error.contains(&format!("{name:?}")), "{name:?}: {error}");
            let opened = store.open(&target).map(|(_, size)| size);
            assert!(invalid_message(opened).contains(expected));
            assert!(invalid_message(store.delete(&target)).contains(expected));
            assert!(store.local_path(&target).is_none(), "{name:?}");
        }
        assert!(!dir.path().join("x").exists());
    }
}

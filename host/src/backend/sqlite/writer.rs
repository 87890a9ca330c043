//! The thread that owns the write connection and commits queued write requests together.
//!
//! Callers send a request (an operation on the connection) over a channel. The thread takes
//! every request that queued up while it committed the previous batch, runs them in one
//! `BEGIN IMMEDIATE` transaction and commits once (group commit). Concurrent writers, such
//! as the daemon's lease, attempt-start and finish batches and concurrent submits, then
//! share the cost of one commit. Each request runs inside its own savepoint: a request that fails
//! is rolled back alone and reports its error, while the others of its batch commit. A
//! commit that fails is reported to every request of the batch.

use std::panic::{self, AssertUnwindSafe};
use std::path::Path;
use std::sync::mpsc;
use std::thread::{self, JoinHandle, ThreadId};
use std::time::Duration;

use rusqlite::Connection;
use tokio::sync::oneshot;

use super::connection::{is_busy, retry_busy};
use crate::{Error, Result};

/// Maximum number of requests committed in one transaction, which keeps a transaction, and
/// so the wait of its first request, short.
const MAX_BATCH_REQUESTS: usize = 128;

/// The result of a request's operation, or the panic it raised.
type Outcome<T> = thread::Result<Result<T>>;

/// Handle to the writer thread. Dropping it lets the thread finish the queued requests
/// and close the connection.
pub(super) struct Writer {
    requests: Option<mpsc::Sender<Box<dyn Request>>>,
    thread: Option<JoinHandle<()>>,
    thread_id: ThreadId,
}

impl Writer {
    /// Starts the thread that owns `connection`. Busy and locked errors roll the batch back
    /// and run it again, for up to `busy_limit`.
    pub(super) fn spawn(connection: Connection, path: &Path, busy_limit: Duration) -> Result<Self> {
        let (requests, receiver) = mpsc::channel::<Box<dyn Request>>();
        let path = path.to_owned();
        let thread = thread::Builder::new()
            .name("bgw-sqlite-writer".into())
            .spawn(move || run_writer(connection, &path, busy_limit, receiver))
            .map_err(|error| Error::io("failed to start the SQLite writer thread", error))?;
        Ok(Writer {
            requests: Some(requests),
            thread_id: thread.thread().id(),
            thread: Some(thread),
        })
    }

    /// Runs `op` in a write transaction and waits, without blocking the async worker, until
    /// that transaction has committed. A panic in `op` is resumed on the caller.
    pub(super) async fn write<T, F>(&self, op: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnMut(&Connection) -> Result<T> + Send + 'static,
    {
        let (reply, receiver) = oneshot::channel();
        self.send(op, move |outcome| {
            let _ = reply.send(outcome);
        })?;
        let outcome = receiver.await.map_err(|_| stopped())?;
        outcome.unwrap_or_else(|panic| panic::resume_unwind(panic))
    }

    /// Runs `op` in a write transaction and blocks the calling thread until it has
    /// committed. A panic in `op` is resumed on the caller.
    pub(super) fn write_blocking<T, F>(&self, op: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnMut(&Connection) -> Result<T> + Send + 'static,
    {
        let (reply, receiver) = mpsc::sync_channel(1);
        self.send(op, move |outcome| {
            let _ = reply.send(outcome);
        })?;
        let outcome = receiver.recv().map_err(|_| stopped())?;
        outcome.unwrap_or_else(|panic| panic::resume_unwind(panic))
    }

    fn send<T, F>(&self, op: F, reply: impl FnOnce(Outcome<T>) + Send + 'static) -> Result<()>
    where
        T: Send + 'static,
        F: FnMut(&Connection) -> Result<T> + Send + 'static,
    {
        let request = Box::new(Pending {
            op,
            outcome: None,
            reply: Box::new(reply),
        });
        self.requests
            .as_ref()
            .ok_or_else(stopped)?
            .send(request)
            .map_err(|_| stopped())
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        drop(self.requests.take());
        // The last handle can be dropped by a request running on the writer thread itself,
        // which must not wait for its own end.
        if thread::current().id() != self.thread_id {
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
        }
    }
}

fn stopped() -> Error {
    Error::Other(anyhow::anyhow!("the SQLite writer thread has stopped"))
}

/// A queued operation with its reply, type-erased so one channel carries every result type.
trait Request: Send {
    /// Runs the operation and keeps its outcome. Returns whether it succeeded, or the busy
    /// or locked error that makes the whole batch start over.
    fn run(&mut self, connection: &Connection) -> Result<bool>;

    /// Sends the kept outcome, or `failure` in its place when the batch did not commit.
    fn reply(self: Box<Self>, failure: Option<Error>);
}

struct Pending<T, F> {
    op: F,
    outcome: Option<Outcome<T>>,
    reply: Box<dyn FnOnce(Outcome<T>) + Send>,
}

impl<T, F> Request for Pending<T, F>
where
    T: Send + 'static,
    F: FnMut(&Connection) -> Result<T> + Send + 'static,
{
    fn run(&mut self, connection: &Connection) -> Result<bool> {
        let outcome = panic::catch_unwind(AssertUnwindSafe(|| (self.op)(connection)));
        let succeeded = match outcome {
            Ok(Err(Error::Sqlite(error))) if is_busy(&error) => return Err(Error::Sqlite(error)),
            Ok(Ok(_)) => true,
            Ok(Err(_)) | Err(_) => false,
        };
        self.outcome = Some(outcome);
        Ok(succeeded)
    }

    fn reply(self: Box<Self>, failure: Option<Error>) {
        let outcome = match failure {
            Some(error) => Ok(Err(error)),
            None => self
                .outcome
                .unwrap_or_else(|| Ok(Err(Error::Other(anyhow::anyhow!("request never ran"))))),
        };
        (self.reply)(outcome);
    }
}

fn run_writer(
    connection: Connection,
    path: &Path,
    busy_limit: Duration,
    receiver: mpsc::Receiver<Box<dyn Request>>,
) {
    let mut batch: Vec<Box<dyn Request>> = Vec::with_capacity(MAX_BATCH_REQUESTS);
    while let Ok(first) = receiver.recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH_REQUESTS {
            match receiver.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }

        let committed = retry_busy(path, busy_limit, || commit_batch(&connection, &mut batch));
        reply_all(batch.drain(..), committed.err());
    }
}

/// Runs every request of `batch` in one transaction and commits it.
///
/// A lone request runs without a savepoint, and its failure rolls the transaction back. In
/// a larger batch each request has a savepoint, so a failure undoes only its own writes.
/// The transaction statements are prepared once and cached, since parsing them for every
/// batch costs about as much as running them.
fn commit_batch(connection: &Connection, batch: &mut [Box<dyn Request>]) -> Result<()> {
    execute(connection, "BEGIN IMMEDIATE")?;
    let result = run_requests(connection, batch).and_then(|commit| match commit {
        true => execute(connection, "COMMIT"),
        false => execute(connection, "ROLLBACK"),
    });
    if result.is_err() && !connection.is_autocommit() {
        if let Err(error) = execute(connection, "ROLLBACK") {
            tracing::warn!(%error, "failed to roll back a failed batch of SQLite writes");
        }
    }
    result
}

/// Runs the requests of one transaction and returns whether it should commit.
fn run_requests(connection: &Connection, batch: &mut [Box<dyn Request>]) -> Result<bool> {
    if let [request] = batch {
        return request.run(connection);
    }
    for request in batch.iter_mut() {
        execute(connection, "SAVEPOINT request")?;
        if !request.run(connection)? {
            execute(connection, "ROLLBACK TO request")?;
        }
        execute(connection, "RELEASE request")?;
    }
    Ok(true)
}

fn execute(connection: &Connection, sql: &str) -> Result<()> {
    connection.prepare_cached(sql)?.execute([])?;
    Ok(())
}

/// Replies to every request: with its own outcome, or with the batch's failure.
fn reply_all(batch: impl Iterator<Item = Box<dyn Request>>, failure: Option<Error>) {
    let Some(failure) = failure else {
        batch.for_each(|request| request.reply(None));
        return;
    };
    tracing::error!(error = %failure, "failed to commit a batch of SQLite writes");
    let message = failure.to_string();
    let mut first = Some(failure);
    for request in batch {
        let error = first
            .take()
            .unwrap_or_else(|| Error::Other(anyhow::anyhow!("{message}")));
        request.reply(Some(error));
    }
}

/// Returns a panic payload's message, for tests.
#[cfg(test)]
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|text| text.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use rusqlite::Connection;

    use super::*;

    /// A writer on a new database with table `t (v TEXT)`, and `child` rows that must name a
    /// `parent` row, checked at commit.
    fn writer(dir: &Path) -> Writer {
        let path = dir.join("test.db");
        let connection = Connection::open(&path).unwrap();
        connection
            .execute_batch(
                "PRAGMA journal_mode = WAL;
                 PRAGMA foreign_keys = ON;
                 CREATE TABLE t (v TEXT);
                 CREATE TABLE parent (id INTEGER PRIMARY KEY);
                 CREATE TABLE child (parent_id INTEGER
                     REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED);",
            )
            .unwrap();
        Writer::spawn(connection, &path, Duration::from_secs(1)).unwrap()
    }

    fn values(dir: &Path) -> Vec<String> {
        let connection = Connection::open(dir.join("test.db")).unwrap();
        let mut statement = connection.prepare("SELECT v FROM t ORDER BY v").unwrap();
        statement
            .query_map([], |row| row.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
    }

    fn insert(value: &'static str) -> impl FnMut(&Connection) -> Result<()> + Send + 'static {
        move |connection| {
            connection.execute("INSERT INTO t (v) VALUES (?1)", [value])?;
            Ok(())
        }
    }

    type TestOp = Box<dyn FnMut(&Connection) -> Result<()> + Send>;

    /// Queues `ops` behind a request that blocks the writer thread, so that they all go
    /// into the next batch, and returns one reply receiver per op.
    fn queue_one_batch(writer: &Writer, ops: Vec<TestOp>) -> Vec<mpsc::Receiver<Outcome<()>>> {
        let (blocked, wait_blocked) = mpsc::channel();
        let (release, wait_release) = mpsc::channel::<()>();
        writer
            .send(
                move |_: &Connection| {
                    blocked.send(()).unwrap();
                    wait_release.recv().unwrap();
                    Ok(())
                },
                |_| {},
            )
            .unwrap();
        wait_blocked.recv().unwrap();

        let replies = ops
            .into_iter()
            .map(|op| {
                let (reply, receiver) = mpsc::channel();
                writer
                    .send(op, move |outcome| reply.send(outcome).unwrap())
                    .unwrap();
                receiver
            })
            .collect();
        release.send(()).unwrap();
        replies
    }

    #[test]
    fn failed_request_leaves_its_batch_committed() {
        let dir = tempfile::tempdir().unwrap();
        let writer = writer(dir.path());

        let replies = queue_one_batch(
            &writer,
            vec![
                Box::new(insert("a")),
                Box::new(|connection: &Connection| {
                    connection.execute("INSERT INTO t (v) VALUES ('b')", [])?;
                    Err(Error::Invalid("rejected b".into()))
                }),
                Box::new(insert("c")),
            ],
        );
        let outcomes: Vec<Result<()>> = replies
            .into_iter()
            .map(|reply| reply.recv().unwrap().unwrap())
            .collect();

        assert!(outcomes[0].is_ok());
        assert_eq!(outcomes[1].as_ref().unwrap_err().to_string(), "rejected b");
        assert!(outcomes[2].is_ok());
        assert_eq!(values(dir.path()), ["a", "c"]);
    }

    #[test]
    fn failed_commit_is_reported_to_every_request() {
        let dir = tempfile::tempdir().unwrap();
        let writer = writer(dir.path());

        let replies = queue_one_batch(
            &writer,
            vec![
                Box::new(insert("a")),
                Box::new(|connection: &Connection| {
                    connection.execute("INSERT INTO child (parent_id) VALUES (7)", [])?;
                    Ok(())
                }),
                Box::new(insert("c")),
            ],
        );

        for reply in replies {
            let error = reply.recv().unwrap().unwrap().unwrap_err().to_string();
            assert!(error.contains("FOREIGN KEY"), "{error}");
        }
        assert!(values(dir.path()).is_empty());
    }

    #[test]
    fn panicking_request_fails_alone() {
        let dir = tempfile::tempdir().unwrap();
        let writer = writer(dir.path());

        let replies = queue_one_batch(
            &writer,
            vec![
                Box::new(insert("a")),
                Box::new(|connection: &Connection| {
                    connection.execute("INSERT INTO t (v) VALUES ('b')", [])?;
                    panic!("guest of honour")
                }),
            ],
        );
        let mut replies = replies.into_iter();

        assert!(replies.next().unwrap().recv().unwrap().unwrap().is_ok());
        let panic = replies.next().unwrap().recv().unwrap().unwrap_err();
        assert_eq!(panic_message(panic.as_ref()), "guest of honour");
        assert_eq!(values(dir.path()), ["a"]);
    }

    #[tokio::test]
    async fn async_write_returns_the_value() {
        let dir = tempfile::tempdir().unwrap();
        let writer = writer(dir.path());

        let id = writer
            .write(|connection| {
                connection.execute("INSERT INTO t (v) VALUES ('a')", [])?;
                Ok(connection.last_insert_rowid())
            })
            .await
            .unwrap();

        assert_eq!(id, 1);
        assert_eq!(values(dir.path()), ["a"]);
    }

    #[test]
    fn lone_failed_request_rolls_back() {
        let dir = tempfile::tempdir().unwrap();
        let writer = writer(dir.path());

        let error = writer
            .write_blocking(|connection| {
                connection.execute("INSERT INTO t (v) VALUES ('a')", [])?;
                Err::<(), _>(Error::Invalid("rejected".into()))
            })
            .unwrap_err();

        assert_eq!(error.to_string(), "rejected");
        assert!(values(dir.path()).is_empty());
    }
}

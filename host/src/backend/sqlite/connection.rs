//! The connections to one SQLite file: the writer thread with the write connection, a pool
//! of read connections and a watcher that notices commits of other connections.
//!
//! Every call retries while the database is busy or locked, with backoff, for up to a
//! bounded time. Several processes sharing the file then wait for each other, and a caller
//! sees an error only when that time runs out. The error names the SQLite code.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{mpsc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use rusqlite::{Connection, ErrorCode};

use super::wake::{self, Listener, Poker};
use super::writer::Writer;
use super::Synchronous;
use crate::{Error, Result};

/// First pause of the busy handler. A write transaction of this backend usually holds the
/// lock for tens to hundreds of microseconds, so a waiter that sleeps SQLite's default
/// first pause of 1 ms waits many times longer than the holder needs.
const BUSY_HANDLER_FIRST_PAUSE: Duration = Duration::from_micros(20);

/// Maximum pause of the busy handler between two tries.
const BUSY_HANDLER_MAX_PAUSE: Duration = Duration::from_millis(1);

/// Tries of the busy handler inside one call before the retry loop takes over: about 1 s
/// of waiting, since all but the first few pauses are [`BUSY_HANDLER_MAX_PAUSE`].
const BUSY_HANDLER_TRIES: i32 = 1_000;

/// Maximum pause between two retries of a busy call.
const MAX_BACKOFF: Duration = Duration::from_millis(100);

/// Read connections kept open for reuse. More are opened when needed, and those above
/// this number are closed after use.
const READ_POOL_SIZE: usize = 4;

/// Prepared statements cached per connection.
const STATEMENT_CACHE_SIZE: usize = 64;

/// Interval of the background checkpointer's passive checkpoints.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(20);

/// WAL size, in pages, at which a commit copies the WAL back into the database file.
/// SQLite's default is 1,000. The same queue and index pages change in every commit, and a
/// checkpoint copies each page once however often it changed, so checkpointing a tenth as
/// often copies far fewer pages per task. The WAL then grows to about 40 MiB at the
/// default 4 KiB page size before it is reused.
const WAL_AUTOCHECKPOINT_PAGES: i64 = 10_000;

/// Interval between two reads of `PRAGMA data_version` while waiting for a change.
const CHANGE_POLL_INTERVAL: Duration = Duration::from_millis(1);

/// The same interval while this process listens on the wake-up socket, where polling
/// only catches pokes that were lost.
const LISTENING_POLL_INTERVAL: Duration = Duration::from_millis(10);

pub(super) struct Database {
    path: PathBuf,
    synchronous: Synchronous,
    busy_limit: Duration,
    /// The thread with the only connection of this process that writes. Every write
    /// transaction starts with `BEGIN IMMEDIATE`, so it takes the write lock before it reads
    /// anything and cannot fail with SQLITE_BUSY halfway through a read-then-write.
    writer: Writer,
    readers: Mutex<Vec<Connection>>,
    /// Connection used only for `PRAGMA data_version`. That value changes only for
    /// commits of other connections, so this connection must never write.
    watcher: Mutex<Connection>,
    /// `data_version` when a waiter last saw it change.
    seen_version: AtomicI64,
    /// Sends a wake-up to the process listening for this file after a commit of new work.
    poker: Poker,
    /// Set in the one process (a daemon) that listens for other processes' wake-ups.
    listener: Mutex<Option<Listener>>,
    /// The background checkpointer, once started: dropping the sender stops it.
    checkpointer: Mutex<Option<(mpsc::Sender<()>, thread::JoinHandle<()>)>>,
}

impl Database {
    /// Opens the file, creating it and its folder if needed, and switches it to WAL mode.
    pub(super) fn open(
        path: &Path,
        synchronous: Synchronous,
        busy_limit: Duration,
    ) -> Result<Self> {
        if let Some(parent) = path
            .parent()
            .filter(|parent| !parent.as_os_str().is_empty())
        {
            std::fs::create_dir_all(parent).map_err(|error| {
                Error::io(format!("failed to create {}", parent.display()), error)
            })?;
        }

        let writer = open_connection(path, synchronous)?;
        let mode: String = retry_busy(path, busy_limit, || {
            let mode =
                writer.pragma_update_and_check(None, "journal_mode", "wal", |row| row.get(0))?;
            Ok(mode)
        })?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(Error::Invalid(format!(
                "cannot switch {} to WAL mode: SQLite reports journal mode {mode:?}",
                path.display()
            )));
        }

        let watcher = open_connection(path, synchronous)?;
        let database = Database {
            path: path.to_owned(),
            synchronous,
            busy_limit,
            writer: Writer::spawn(writer, path, busy_limit)?,
            readers: Mutex::new(Vec::new()),
            watcher: Mutex::new(watcher),
            seen_version: AtomicI64::new(0),
            poker: Poker::new(wake::socket_path(path)),
            listener: Mutex::new(None),
            checkpointer: Mutex::new(None),
        };
        let version = database.data_version()?;
        database.seen_version.store(version, Ordering::Relaxed);
        Ok(database)
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `op` in a `BEGIN IMMEDIATE` transaction on the writer thread and waits until it
    /// has committed, possibly together with other requests (see [`Writer`]).
    ///
    /// A busy or locked error anywhere rolls the transaction back and runs `op` again,
    /// which is why `op` may be called more than once. Any other error undoes the writes of
    /// `op` and is returned.
    pub(super) async fn write<T, F>(&self, op: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnMut(&Connection) -> Result<T> + Send + 'static,
    {
        self.writer.write(op).await
    }

    /// Like [`Database::write`], but blocks the calling thread.
    pub(super) fn write_blocking<T, F>(&self, op: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnMut(&Connection) -> Result<T> + Send + 'static,
    {
        self.writer.write_blocking(op)
    }

    /// Runs `op` in a read transaction on a pooled read connection, so that all its
    /// statements see one snapshot of the database.
    pub(super) fn read<T>(&self, mut op: impl FnMut(&Connection) -> Result<T>) -> Result<T> {
        let pooled = lock(&self.readers).pop();
        let connection = match pooled {
            Some(connection) => connection,
            None => open_connection(&self.path, self.synchronous)?,
        };

        let result = retry_busy(&self.path, self.busy_limit, || {
            let transaction = connection.unchecked_transaction()?;
            let value = op(&transaction)?;
            transaction.finish()?;
            Ok(value)
        });

        let mut readers = lock(&self.readers);
        if readers.len() < READ_POOL_SIZE {
            readers.push(connection);
        }
        result
    }

    /// Blocks until another connection, in this process or another, commits a change to
    /// the file, or until `timeout` passes.
    ///
    /// A change committed since the last wake-up of any waiter ends the wait at once, so a
    /// commit that lands between two waits is not missed.
    pub(super) fn wait_for_change(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let seen = self.seen_version.load(Ordering::Relaxed);
        let listener = self.listener.try_lock().ok();
        let listener = listener.as_ref().and_then(|guard| guard.as_ref());
        loop {
            match self.data_version() {
                Ok(version) if version != seen => {
                    self.seen_version.store(version, Ordering::Relaxed);
                    return;
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(%error, path = %self.path.display(), "failed to read data_version");
                    thread::sleep(deadline.saturating_duration_since(Instant::now()));
                    return;
                }
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return;
            }
            // A poke is followed by another read of data_version, which ends the wait only
            // if something was committed.
            match listener {
                Some(listener) => {
                    listener.wait(LISTENING_POLL_INTERVAL.min(remaining));
                }
                None => thread::sleep(CHANGE_POLL_INTERVAL.min(remaining)),
            }
        }
    }

    /// Starts listening on the wake-up socket, so that other processes' commits of new
    /// work end [`Database::wait_for_change`] at once. Returns false when another process
    /// listens already or the socket cannot be bound; waits then keep polling.
    pub(super) fn listen_for_wakeups(&self) -> bool {
        let mut listener = lock(&self.listener);
        if listener.is_some() {
            return true;
        }
        let path = wake::socket_path(&self.path);
        match Listener::bind(&path) {
            Ok(Some(bound)) => {
                tracing::debug!(path = %path.display(), "listening for wake-ups");
                *listener = Some(bound);
                true
            }
            Ok(None) => {
                tracing::info!(path = %path.display(), "another process listens for wake-ups on this database: polling for new tasks instead");
                false
            }
            Err(error) => {
                tracing::warn!(%error, path = %path.display(), "failed to bind the wake-up socket: polling for new tasks instead");
                false
            }
        }
    }

    /// Starts a thread that runs a passive checkpoint every [`CHECKPOINT_INTERVAL`], on a
    /// connection of its own.
    ///
    /// Otherwise the commit that crosses [`WAL_AUTOCHECKPOINT_PAGES`] copies the WAL into
    /// the database file and syncs it, which stalls a submitter or the writer thread for
    /// tens of milliseconds. A passive checkpoint takes no write lock, so writers go on
    /// meanwhile, and the automatic checkpoint stays as a backstop for when the thread
    /// falls behind or no daemon runs.
    pub(super) fn start_checkpointer(&self) {
        let mut running = lock(&self.checkpointer);
        if running.is_some() {
            return;
        }
        let connection = match open_connection(&self.path, self.synchronous) {
            Ok(connection) => connection,
            Err(error) => {
                tracing::warn!(%error, "failed to open a connection for background checkpoints");
                return;
            }
        };
        let (stop, stopped) = mpsc::channel();
        let spawned = thread::Builder::new()
            .name("bgw-checkpoint".into())
            .spawn(move || run_checkpoints(&connection, &stopped));
        match spawned {
            Ok(thread) => *running = Some((stop, thread)),
            Err(error) => tracing::warn!(%error, "failed to start the checkpoint thread"),
        }
    }

    /// Wakes the process that listens for this file, if any. Call it after a commit that
    /// made a message visible.
    pub(super) fn poke(&self) {
        self.poker.poke();
    }

    fn data_version(&self) -> Result<i64> {
        let watcher = lock(&self.watcher);
        retry_busy(&self.path, self.busy_limit, || {
            let mut statement = watcher.prepare_cached("PRAGMA data_version")?;
            Ok(statement.query_row([], |row| row.get(0))?)
        })
    }
}

impl Drop for Database {
    /// Stops the checkpointer and waits for it, so that its connection is closed with the
    /// others. The last connection to close checkpoints the WAL and deletes it.
    fn drop(&mut self) {
        if let Some((stop, thread)) = lock(&self.checkpointer).take() {
            drop(stop);
            let _ = thread.join();
        }
    }
}

/// Runs a passive checkpoint every [`CHECKPOINT_INTERVAL`] until `stop` is disconnected.
fn run_checkpoints(connection: &Connection, stop: &mpsc::Receiver<()>) {
    let mut failures = 0u64;
    while let Err(mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(CHECKPOINT_INTERVAL) {
        let checkpoint = connection.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
        if let Err(error) = checkpoint {
            failures += 1;
            // Logged on the first failure and then every thousandth, about every 20 s.
            if failures % 1000 == 1 {
                tracing::warn!(%error, failures, "background checkpoint failed");
            }
        }
    }
}

fn open_connection(path: &Path, synchronous: Synchronous) -> Result<Connection> {
    let connection = Connection::open(path).map_err(|error| {
        Error::Other(anyhow::anyhow!(
            "failed to open SQLite database {}: {error}",
            path.display()
        ))
    })?;
    connection.busy_handler(Some(wait_while_busy))?;
    connection.pragma_update(None, "synchronous", synchronous.pragma_value())?;
    connection.set_prepared_statement_cache_capacity(STATEMENT_CACHE_SIZE);
    connection.pragma_update(None, "wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES)?;
    // Savepoints of the writer's batches keep their undo pages here instead of in a file.
    connection.pragma_update(None, "temp_store", "MEMORY")?;
    Ok(connection)
}

/// SQLite's busy handler: pauses before another try of a locked database, starting short
/// and doubling up to [`BUSY_HANDLER_MAX_PAUSE`], and gives up after [`BUSY_HANDLER_TRIES`].
///
/// SQLite has no way to block until another process releases its lock, so a waiter
/// polls, and the pauses bound how late it notices the release.
fn wait_while_busy(tries: i32) -> bool {
    if tries >= BUSY_HANDLER_TRIES {
        return false;
    }
    let doublings = u32::try_from(tries).unwrap_or(0).min(10);
    let pause = (BUSY_HANDLER_FIRST_PAUSE * (1 << doublings)).min(BUSY_HANDLER_MAX_PAUSE);
    thread::sleep(pause);
    true
}

/// Locks a mutex, recovering it after a panic of another holder. A panic inside a
/// transaction drops the transaction, which rolls it back, so the connection is usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Runs `op` until it succeeds, fails with an error other than busy or locked, or `limit`
/// has passed since the first try.
///
/// NOTE: waiting is not fair. Both SQLite's busy handler and this loop sleep between
/// tries, so a connection that commits in a tight loop can keep another waiting for most
/// of `limit`. Tests saw one of two processes lease nothing while the other leased 400
/// messages in a loop.
pub(super) fn retry_busy<T>(
    path: &Path,
    limit: Duration,
    mut op: impl FnMut() -> Result<T>,
) -> Result<T> {
    let started = Instant::now();
    let mut backoff = Duration::from_millis(1);
    let mut retries = 0u32;
    loop {
        let error = match op() {
            Err(Error::Sqlite(error)) if is_busy(&error) => error,
            other => return other,
        };

        let waited = started.elapsed();
        if waited >= limit {
            return Err(busy_error(path, &error, waited, retries));
        }
        tracing::debug!(%error, retries, path = %path.display(), "database busy, retrying");

        let jitter = rand::random_range(0..=backoff.as_micros() as u64 / 2);
        let pause = backoff + Duration::from_micros(jitter);
        thread::sleep(pause.min(limit - waited));
        backoff = (backoff * 2).min(MAX_BACKOFF);
        retries += 1;
    }
}

pub(super) fn is_busy(error: &rusqlite::Error) -> bool {
    matches!(
        error.sqlite_error_code(),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
    )
}

fn busy_error(path: &Path, error: &rusqlite::Error, waited: Duration, retries: u32) -> Error {
    let code = error.sqlite_error().map_or(0, |error| error.extended_code);
    Error::Other(anyhow::anyhow!(
        "database {} stayed busy for {:.1} s across {retries} retries ({}, extended code \
         {code}): {error}; another process holds the write lock for too long",
        path.display(),
        waited.as_secs_f64(),
        busy_code_name(code)
    ))
}

/// Names the busy and locked result codes, with the values `sqlite3.h` gives them.
fn busy_code_name(extended_code: i32) -> &'static str {
    match extended_code {
        5 => "SQLITE_BUSY",
        261 => "SQLITE_BUSY_RECOVERY",
        517 => "SQLITE_BUSY_SNAPSHOT",
        773 => "SQLITE_BUSY_TIMEOUT",
        6 => "SQLITE_LOCKED",
        262 => "SQLITE_LOCKED_SHAREDCACHE",
        518 => "SQLITE_LOCKED_VTAB",
        code if code & 0xff == 5 => "SQLITE_BUSY",
        _ => "SQLITE_LOCKED",
    }
}

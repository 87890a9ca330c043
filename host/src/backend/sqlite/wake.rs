//! Wake-ups across processes: a Unix datagram socket beside the database file, which a
//! daemon listens on and which every process pokes after it commits new work.
//!
//! A poke only shortens a wait. Waiters still poll `PRAGMA data_version`, more slowly while
//! they listen, so a lost poke (a full socket buffer, a second daemon that could not bind,
//! a path too long for a socket address) costs latency, never a task.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Returns the socket path for a database file: the file's path with `-wake` appended,
/// like SQLite's own `-wal` and `-shm` files.
pub(super) fn socket_path(db_path: &Path) -> PathBuf {
    let mut path = db_path.as_os_str().to_owned();
    path.push("-wake");
    PathBuf::from(path)
}

/// The sending side: an unbound, non-blocking socket.
pub(super) struct Poker {
    socket: Option<UnixDatagram>,
    path: PathBuf,
}

impl Poker {
    pub(super) fn new(path: PathBuf) -> Self {
        let socket = UnixDatagram::unbound()
            .and_then(|socket| socket.set_nonblocking(true).map(|()| socket))
            .inspect_err(|error| tracing::debug!(%error, "no wake-up socket for submits"))
            .ok();
        Poker { socket, path }
    }

    /// Sends one empty datagram to the listener, if there is one. Never blocks: with no
    /// listener, or a full buffer (a poke is already pending), the datagram is dropped.
    pub(super) fn poke(&self) {
        if let Some(socket) = &self.socket {
            let _ = socket.send_to(&[], &self.path);
        }
    }
}

/// The receiving side, bound to the socket path by one process at a time.
pub(super) struct Listener {
    socket: UnixDatagram,
    path: PathBuf,
    /// Inode of the bound socket file, so that drop removes only its own file.
    inode: u64,
}

impl Listener {
    /// Binds the socket path. Returns `None` when another live process listens there. A
    /// file left by a process that died is replaced.
    pub(super) fn bind(path: &Path) -> io::Result<Option<Listener>> {
        if path.exists() {
            let probe = UnixDatagram::unbound()?;
            probe.set_nonblocking(true)?;
            match probe.send_to(&[], path) {
                Ok(_) => return Ok(None),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(error) if error.kind() == io::ErrorKind::ConnectionRefused => {
                    std::fs::remove_file(path)?;
                }
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(error) => return Err(error),
            }
        }
        let socket = match UnixDatagram::bind(path) {
            Ok(socket) => socket,
            Err(error) if error.kind() == io::ErrorKind::AddrInUse => return Ok(None),
            Err(error) => return Err(error),
        };
        let inode = std::fs::metadata(path)?.ino();
        Ok(Some(Listener {
            socket,
            path: path.to_owned(),
            inode,
        }))
    }

    /// Blocks until a poke arrives or `timeout` passes, and returns whether one arrived.
    /// Pokes that queued up meanwhile are consumed with it.
    pub(super) fn wait(&self, timeout: Duration) -> bool {
        // A zero read timeout would mean "no timeout".
        let timeout = timeout.max(Duration::from_micros(1));
        let mut buffer = [0u8; 16];
        if self.socket.set_read_timeout(Some(timeout)).is_err()
            || self.socket.recv(&mut buffer).is_err()
        {
            return false;
        }
        if self.socket.set_nonblocking(true).is_ok() {
            while self.socket.recv(&mut buffer).is_ok() {}
            let _ = self.socket.set_nonblocking(false);
        }
        true
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let ours = std::fs::metadata(&self.path).is_ok_and(|meta| meta.ino() == self.inode);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poke_ends_the_wait() {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(&dir.path().join("bgw.db"));
        let listener = Listener::bind(&path).unwrap().unwrap();
        let poker = Poker::new(path);

        poker.poke();
        poker.poke();

        assert!(listener.wait(Duration::from_secs(5)));
        assert!(!listener.wait(Duration::from_millis(10)));
    }

    #[test]
    fn second_listener_is_refused_while_the_first_lives() {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(&dir.path().join("bgw.db"));
        let first = Listener::bind(&path).unwrap();

        assert!(first.is_some());
        assert!(Listener::bind(&path).unwrap().is_none());
        drop(first);
        assert!(!path.exists());
        assert!(Listener::bind(&path).unwrap().is_some());
    }

    #[test]
    fn stale_socket_file_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(&dir.path().join("bgw.db"));
        // A socket file whose process is gone: bound, then closed without removing it.
        drop(UnixDatagram::bind(&path).unwrap());

        let listener = Listener::bind(&path).unwrap().unwrap();
        Poker::new(path).poke();

        assert!(listener.wait(Duration::from_secs(5)));
    }

    #[test]
    fn poke_without_listener_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(&dir.path().join("bgw.db"));

        Poker::new(path.clone()).poke();

        assert!(!path.exists());
    }
}

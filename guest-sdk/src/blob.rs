//! Input and output blobs, read and written through the host in chunks.

use std::io::{self, BufRead, Read, Seek, SeekFrom, Write};

/// Bytes moved per host call. Bounds the guest memory one read or write takes, while keeping
/// the number of host calls for a large blob low.
pub const CHUNK_SIZE: usize = 64 * 1024;

/// Reads up to `max-len` bytes at `offset`, like the host's `read-input`.
type ReadChunk = Box<dyn FnMut(u64, u32) -> Result<Vec<u8>, String>>;

/// Appends bytes to the output blob, like the host's `write-output`.
type WriteChunk = Box<dyn FnMut(&[u8]) -> Result<(), String>>;

/// The task's input blob, read from the host on demand.
///
/// Implements [`Read`], [`BufRead`] and [`Seek`]. Each refill of the internal buffer is one
/// `read-input` call of up to [`CHUNK_SIZE`] bytes, so wrapping it in a `BufReader` is not
/// needed. A host error surfaces as an [`io::Error`] with the host's message.
pub struct InputBlob {
    len: u64,
    read_chunk: ReadChunk,
    /// Bytes of the blob starting at `buffer_start`.
    buffer: Vec<u8>,
    buffer_start: u64,
    /// Index in `buffer` of the next byte to return, so the stream position is
    /// `buffer_start + cursor`.
    cursor: usize,
}

impl InputBlob {
    pub(crate) fn new(len: u64, read_chunk: ReadChunk) -> Self {
        Self {
            len,
            read_chunk,
            buffer: Vec::new(),
            buffer_start: 0,
            cursor: 0,
        }
    }

    /// Returns the blob's size in bytes, as the host's `input-size` reported it.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Returns true when the blob has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Returns the offset of the next byte a read returns.
    pub fn position(&self) -> u64 {
        self.buffer_start + self.cursor as u64
    }

    /// Reads the remaining bytes into a vector sized from the blob's length.
    pub fn read_to_vec(&mut self) -> io::Result<Vec<u8>> {
        let remaining = self.len.saturating_sub(self.position());
        let mut bytes = Vec::with_capacity(usize::try_from(remaining).unwrap_or(0));
        self.read_to_end(&mut bytes)?;
        Ok(bytes)
    }
}

impl BufRead for InputBlob {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.cursor == self.buffer.len() {
            let position = self.position();
            self.buffer_start = position;
            self.cursor = 0;
            self.buffer.clear();
            if position < self.len {
                self.buffer = (self.read_chunk)(position, CHUNK_SIZE as u32)
                    .map_err(|message| io::Error::other(format!("read-input failed: {message}")))?;
            }
        }
        Ok(&self.buffer[self.cursor..])
    }

    fn consume(&mut self, amount: usize) {
        self.cursor = (self.cursor + amount).min(self.buffer.len());
    }
}

impl Read for InputBlob {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let available = self.fill_buf()?;
        let count = available.len().min(out.len());
        out[..count].copy_from_slice(&available[..count]);
        self.consume(count);
        Ok(count)
    }
}

impl Seek for InputBlob {
    fn seek(&mut self, target: SeekFrom) -> io::Result<u64> {
        let (base, offset) = match target {
            SeekFrom::Start(offset) => (0, i128::from(offset)),
            SeekFrom::End(offset) => (self.len, i128::from(offset)),
            SeekFrom::Current(offset) => (self.position(), i128::from(offset)),
        };
        let position = u64::try_from(i128::from(base) + offset).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid seek to {target:?}: position would be negative or past u64"),
            )
        })?;

        // Keep the buffer when the new position falls inside it, so short seeks cost no call.
        let buffer_end = self.buffer_start + self.buffer.len() as u64;
        if (self.buffer_start..=buffer_end).contains(&position) {
            self.cursor = (position - self.buffer_start) as usize;
        } else {
            self.buffer.clear();
            self.buffer_start = position;
            self.cursor = 0;
        }
        Ok(position)
    }
}

/// The task's output blob, appended to through the host's `write-output`.
///
/// Implements [`Write`]. Bytes are buffered and sent in calls of [`CHUNK_SIZE`] bytes. When the
/// host rejects a call, for example because the output would pass the activity's output size
/// limit, the write or flush returns an [`io::Error`] with the host's message and the rejected
/// bytes are dropped. Call [`flush`](Write::flush) before returning: dropping the blob also
/// sends buffered bytes but cannot report an error.
pub struct OutputBlob {
    write_chunk: WriteChunk,
    buffer: Vec<u8>,
    accepted: u64,
}

impl OutputBlob {
    pub(crate) fn new(write_chunk: WriteChunk) -> Self {
        Self {
            write_chunk,
            buffer: Vec::with_capacity(CHUNK_SIZE),
            accepted: 0,
        }
    }

    /// Returns how many bytes the host has accepted through this blob so far. Buffered bytes
    /// count once a write or flush has sent them.
    pub fn bytes_written(&self) -> u64 {
        self.accepted
    }

    fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        (self.write_chunk)(bytes)
            .map_err(|message| io::Error::other(format!("write-output failed: {message}")))?;
        self.accepted += bytes.len() as u64;
        Ok(())
    }

    fn send_buffer(&mut self) -> io::Result<()> {
        let buffer = std::mem::take(&mut self.buffer);
        let result = self.send(&buffer);
        self.buffer = buffer;
        self.buffer.clear();
        result
    }
}

impl Write for OutputBlob {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        // Send a full buffer before taking new bytes, so an error never follows accepted bytes.
        if self.buffer.len() == CHUNK_SIZE {
            self.send_buffer()?;
        }

        if self.buffer.is_empty() && data.len() >= CHUNK_SIZE {
            self.send(&data[..CHUNK_SIZE])?;
            return Ok(CHUNK_SIZE);
        }

        let appended = (CHUNK_SIZE - self.buffer.len()).min(data.len());
        self.buffer.extend_from_slice(&data[..appended]);
        Ok(appended)
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        self.send_buffer()
    }
}

impl Drop for OutputBlob {
    fn drop(&mut self) {
        // NOTE: an error here is lost. `flush` is the way to see it.
        let _ = self.flush();
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::rc::Rc;

    use super::*;

    /// Each `(offset, max_len)` request a fake `read-input` received.
    type ReadCalls = Rc<RefCell<Vec<(u64, u32)>>>;

    /// Builds an input blob over `data` that records each `(offset, max_len)` request.
    fn input_over(data: Vec<u8>) -> (InputBlob, ReadCalls) {
        let calls = Rc::new(RefCell::new(Vec::new()));
        let recorded = Rc::clone(&calls);
        let len = data.len() as u64;
        let blob = InputBlob::new(
            len,
            Box::new(move |offset, max_len| {
                recorded.borrow_mut().push((offset, max_len));
                let start = (offset as usize).min(data.len());
                let end = (start + max_len as usize).min(data.len());
                Ok(data[start..end].to_vec())
            }),
        );
        (blob, calls)
    }

    /// Builds an output blob that stores accepted bytes and rejects writes past `limit`.
    fn output_with_limit(limit: usize) -> (OutputBlob, Rc<RefCell<Vec<Vec<u8>>>>) {
        let chunks = Rc::new(RefCell::new(Vec::<Vec<u8>>::new()));
        let recorded = Rc::clone(&chunks);
        let blob = OutputBlob::new(Box::new(move |bytes| {
            let stored: usize = recorded.borrow().iter().map(Vec::len).sum();
            if stored + bytes.len() > limit {
                return Err(format!(
                    "output blob would exceed the limit of {limit} bytes"
                ));
            }
            recorded.borrow_mut().push(bytes.to_vec());
            Ok(())
        }));
        (blob, chunks)
    }

    fn sample(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    #[test]
    fn input_reads_whole_blob_in_chunks() {
        let data = sample(CHUNK_SIZE * 2 + 100);
        let (mut blob, calls) = input_over(data.clone());

        let read = blob.read_to_vec().unwrap();

        assert_eq!(read, data);
        let offsets: Vec<u64> = calls.borrow().iter().map(|call| call.0).collect();
        assert_eq!(offsets, [0, CHUNK_SIZE as u64, 2 * CHUNK_SIZE as u64]);
        assert!(calls
            .borrow()
            .iter()
            .all(|call| call.1 == CHUNK_SIZE as u32));
    }

    #[test]
    fn input_at_end_makes_no_host_call() {
        let (mut blob, calls) = input_over(Vec::new());
        let mut out = [0u8; 8];
        assert_eq!(blob.read(&mut out).unwrap(), 0);
        assert!(calls.borrow().is_empty());
        assert!(blob.is_empty());
    }

    #[test]
    fn input_seek_reads_from_new_position() {
        let data = sample(CHUNK_SIZE * 3);
        let (mut blob, _calls) = input_over(data.clone());
        let mut out = [0u8; 4];

        blob.seek(SeekFrom::Start(CHUNK_SIZE as u64 + 7)).unwrap();
        blob.read_exact(&mut out).unwrap();
        assert_eq!(out, data[CHUNK_SIZE + 7..CHUNK_SIZE + 11]);

        blob.seek(SeekFrom::Current(-4)).unwrap();
        blob.read_exact(&mut out).unwrap();
        assert_eq!(out, data[CHUNK_SIZE + 7..CHUNK_SIZE + 11]);

        let end = blob.seek(SeekFrom::End(-4)).unwrap();
        assert_eq!(end, data.len() as u64 - 4);
        blob.read_exact(&mut out).unwrap();
        assert_eq!(out, data[data.len() - 4..]);
    }

    #[test]
    fn input_seek_within_buffer_reuses_it() {
        let (mut blob, calls) = input_over(sample(1000));
        let mut out = [0u8; 10];
        blob.read_exact(&mut out).unwrap();
        blob.seek(SeekFrom::Start(500)).unwrap();
        blob.read_exact(&mut out).unwrap();
        assert_eq!(calls.borrow().len(), 1);
    }

    #[test]
    fn input_seek_before_start_fails() {
        let (mut blob, _calls) = input_over(sample(10));
        let error = blob.seek(SeekFrom::Current(-1)).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn input_host_error_surfaces_as_io_error() {
        let mut blob = InputBlob::new(10, Box::new(|_, _| Err("blob store offline".into())));
        let error = blob.read_to_vec().unwrap_err();
        assert_eq!(error.to_string(), "read-input failed: blob store offline");
    }

    #[test]
    fn input_lines_work_through_buf_read() {
        let (blob, _calls) = input_over(b"one\ntwo\nthree".to_vec());
        let lines: Vec<String> = blob.lines().map(Result::unwrap).collect();
        assert_eq!(lines, ["one", "two", "three"]);
    }

    #[test]
    fn output_sends_full_chunks_then_rest_on_flush() {
        let (mut blob, chunks) = output_with_limit(usize::MAX);
        let data = sample(CHUNK_SIZE * 2 + 5);

        blob.write_all(&data[..3]).unwrap();
        blob.write_all(&data[3..]).unwrap();
        blob.flush().unwrap();

        let sizes: Vec<usize> = chunks.borrow().iter().map(Vec::len).collect();
        assert_eq!(sizes, [CHUNK_SIZE, CHUNK_SIZE, 5]);
        assert_eq!(chunks.borrow().concat(), data);
        assert_eq!(blob.bytes_written(), data.len() as u64);
    }

    #[test]
    fn output_small_writes_wait_for_flush() {
        let (mut blob, chunks) = output_with_limit(usize::MAX);
        blob.write_all(b"word,count\n").unwrap();
        assert!(chunks.borrow().is_empty());
        assert_eq!(blob.bytes_written(), 0);

        blob.flush().unwrap();
        assert_eq!(chunks.borrow().concat(), b"word,count\n");
        assert_eq!(blob.bytes_written(), 11);
    }

    #[test]
    fn output_over_limit_returns_host_message() {
        let (mut blob, _chunks) = output_with_limit(CHUNK_SIZE + 10);
        let data = sample(CHUNK_SIZE * 2);

        let error = blob
            .write_all(&data)
            .and_then(|()| blob.flush())
            .unwrap_err();

        assert_eq!(
            error.to_string(),
            format!(
                "write-output failed: output blob would exceed the limit of {} bytes",
                CHUNK_SIZE + 10
            )
        );
        assert_eq!(blob.bytes_written(), CHUNK_SIZE as u64);
    }

    #[test]
    fn output_drop_sends_buffered_bytes() {
        let (mut blob, chunks) = output_with_limit(usize::MAX);
        blob.write_all(b"tail").unwrap();
        drop(blob);
        assert_eq!(chunks.borrow().concat(), b"tail");
    }
}

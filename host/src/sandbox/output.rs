//! Bounded capture of guest stdout, stderr and log lines.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};

/// Text that keeps its first `capacity` bytes and counts what it drops.
///
/// Writes never fail, so a guest that prints without end is not stopped by its output:
/// only its fuel and deadline stop it.
#[derive(Clone)]
pub struct BoundedText {
    inner: Arc<Mutex<Buffer>>,
}

struct Buffer {
    bytes: Vec<u8>,
    capacity: usize,
    dropped: u64,
}

impl BoundedText {
    /// Creates an empty buffer that keeps at most `capacity` bytes.
    pub fn new(capacity: usize) -> Self {
        BoundedText {
            inner: Arc::new(Mutex::new(Buffer {
                bytes: Vec::new(),
                capacity,
                dropped: 0,
            })),
        }
    }

    /// Appends bytes, dropping what does not fit.
    pub fn push(&self, data: &[u8]) {
        let mut buffer = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let room = buffer.capacity.saturating_sub(buffer.bytes.len());
        let accepted = room.min(data.len());
        buffer.bytes.extend_from_slice(&data[..accepted]);
        buffer.dropped += (data.len() - accepted) as u64;
    }

    /// Returns the kept text (invalid UTF-8 replaced) and a line counting dropped bytes.
    pub fn text(&self) -> String {
        let buffer = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut text = String::from_utf8_lossy(&buffer.bytes).into_owned();
        if buffer.dropped > 0 {
            if !text.ends_with('\n') {
                text.push('\n');
            }
            text.push_str(&format!(
                "[{} more bytes dropped: the log keeps {} bytes]\n",
                buffer.dropped, buffer.capacity
            ));
        }
        text
    }
}

impl IsTerminal for BoundedText {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for BoundedText {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[async_trait::async_trait]
impl OutputStream for BoundedText {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        Ok(64 * 1024)
    }
}

#[async_trait::async_trait]
impl Pollable for BoundedText {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for BoundedText {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_text_drops_overflow() {
        let text = BoundedText::new(4);
        text.push(b"abcdef");
        let shown = text.text();
        assert!(shown.starts_with("abcd\n"), "{shown}");
        assert!(shown.contains("[2 more bytes dropped"), "{shown}");
    }
}

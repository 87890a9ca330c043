//! Example activity `hostile`: misbehaves in the way the payload's `mode` names, so the
//! host's sandbox tests can check that each fault becomes a task error and nothing more.
//!
//! Loops and recursion go through [`black_box`] so the optimizer can neither remove them
//! nor turn the recursion into a loop.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::io::Write;
use std::time::Duration;

use bgw_guest::{Context, Error, OutputBlob, Result};
use serde::Deserialize;
use serde_json::{json, Value};

const MIB: usize = 1024 * 1024;

/// Behaviour the payload picks with `"mode"`. The other payload fields depend on the mode.
#[derive(Deserialize)]
#[serde(tag = "mode", rename_all = "kebab-case")]
enum Mode {
    /// Loops forever without a host call, like `(loop $l br $l)`.
    Spin,
    /// Counts down from 2^31 - 1, then traps.
    BurnThenTrap,
    /// Allocates and touches 1 MiB chunks, keeping each, until allocation fails.
    MemoryHog,
    /// Recurses `depth` levels without tail calls.
    Recurse {
        #[serde(default = "default_depth")]
        depth: u64,
    },
    /// Recurses `depth` levels, calling the host `log` at each level.
    RecurseThenLog {
        #[serde(default = "default_depth")]
        depth: u64,
    },
    /// Panics with the message "hostile guest panicked on purpose".
    Panic,
    /// Executes the wasm `unreachable` instruction.
    Trap,
    /// Sleeps `ms` milliseconds inside a WASI call.
    Sleep {
        #[serde(default = "default_sleep_ms")]
        ms: u64,
    },
    /// Tries to read the file at `path`.
    ReadFile {
        #[serde(default = "default_path")]
        path: String,
    },
    /// Returns the environment variables the guest can see.
    ReadEnv,
    /// Tries to open a TCP connection to `addr`.
    Connect {
        #[serde(default = "default_addr")]
        addr: String,
    },
    /// Writes `bytes` bytes to the output blob.
    WriteOutput {
        #[serde(default = "default_bytes")]
        bytes: u64,
    },
    /// Returns a JSON string result of exactly `bytes` bytes, quotes included.
    BigResult {
        #[serde(default = "default_bytes")]
        bytes: u64,
    },
    /// Prints `lines` lines to stdout and as many to stderr.
    Stdout {
        #[serde(default = "default_lines")]
        lines: u64,
    },
    /// Returns the payload unchanged.
    Echo,
    /// Returns an `invalid-input` task error.
    InvalidInput { message: Option<String> },
    /// Returns a `failed` task error.
    Failed { message: Option<String> },
    /// Returns a `retryable` task error.
    Retryable { message: Option<String> },
}

fn default_depth() -> u64 {
    1_000_000
}

fn default_sleep_ms() -> u64 {
    60_000
}

fn default_path() -> String {
    "/etc/passwd".to_owned()
}

fn default_addr() -> String {
    "127.0.0.1:9".to_owned()
}

fn default_bytes() -> u64 {
    MIB as u64
}

fn default_lines() -> u64 {
    10
}

fn hostile(ctx: &mut Context, payload: Value) -> Result<Value> {
    let mode = Mode::deserialize(&payload)
        .map_err(|error| Error::invalid_input(format!("invalid hostile payload: {error}")))?;

    match mode {
        Mode::Spin => spin(),
        Mode::BurnThenTrap => burn_then_trap(),
        Mode::MemoryHog => memory_hog(),
        Mode::Recurse { depth } => Ok(json!({ "depth": recurse(depth) })),
        Mode::RecurseThenLog { depth } => Ok(json!({ "depth": recurse_then_log(ctx, depth) })),
        Mode::Panic => panic!("hostile guest panicked on purpose"),
        Mode::Trap => trap(),
        Mode::Sleep { ms } => {
            std::thread::sleep(Duration::from_millis(ms));
            Ok(json!({ "slept_ms": ms }))
        }
        Mode::ReadFile { path } => Ok(read_file(&path)),
        Mode::ReadEnv => Ok(read_env()),
        Mode::Connect { addr } => Ok(connect(&addr)),
        Mode::WriteOutput { bytes } => Ok(write_output(ctx.output(), bytes)),
        Mode::BigResult { bytes } => Ok(big_result(bytes)),
        Mode::Stdout { lines } => Ok(print_lines(lines)),
        Mode::Echo => Ok(payload),
        Mode::InvalidInput { message } => Err(Error::invalid_input(message_or_default(
            message,
            "invalid-input",
        ))),
        Mode::Failed { message } => Err(Error::failed(message_or_default(message, "failed"))),
        Mode::Retryable { message } => {
            Err(Error::retryable(message_or_default(message, "retryable")))
        }
    }
}

fn spin() -> ! {
    loop {
        black_box(());
    }
}

fn burn_then_trap() -> ! {
    let mut remaining: i32 = black_box(i32::MAX);
    while remaining > 0 {
        remaining = black_box(remaining - 1);
    }
    trap()
}

fn memory_hog() -> ! {
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    loop {
        let mut chunk = vec![0u8; MIB];
        // Write one byte per 4 KiB so every page of the chunk is touched.
        for page in chunk.chunks_mut(4096) {
            page[0] = 1;
        }
        chunks.push(black_box(chunk));
    }
}

/// Recurses `depth` levels and returns the depth reached. The work after the call keeps it
/// out of tail position, and the frame's array keeps a frame on the shadow stack too.
#[inline(never)]
fn recurse(depth: u64) -> u64 {
    if depth == 0 {
        return 0;
    }
    let frame = [depth; 4];
    black_box(&frame);
    let below = recurse(black_box(depth - 1));
    black_box(below) + 1
}

#[inline(never)]
fn recurse_then_log(ctx: &Context, depth: u64) -> u64 {
    if depth == 0 {
        return 0;
    }
    ctx.log_info(&format!("hostile guest recursing, {depth} levels to go"));
    let below = recurse_then_log(ctx, black_box(depth - 1));
    black_box(below) + 1
}

fn trap() -> ! {
    #[cfg(target_arch = "wasm32")]
    core::arch::wasm32::unreachable();
    #[cfg(not(target_arch = "wasm32"))]
    std::process::abort();
}

fn read_file(path: &str) -> Value {
    match std::fs::read(path) {
        Ok(bytes) => json!({ "ok": true, "path": path, "bytes": bytes.len() }),
        Err(error) => json!({ "ok": false, "path": path, "error": error.to_string() }),
    }
}

fn read_env() -> Value {
    let vars: BTreeMap<String, String> = std::env::vars().collect();
    json!({ "vars": vars })
}

fn connect(addr: &str) -> Value {
    match std::net::TcpStream::connect(addr) {
        Ok(stream) => {
            let peer = stream.peer_addr().map(|peer| peer.to_string()).ok();
            json!({ "ok": true, "addr": addr, "peer": peer })
        }
        Err(error) => json!({ "ok": false, "addr": addr, "error": error.to_string() }),
    }
}

/// Writes `bytes` bytes of `x` and returns how many the host accepted, with its error if any.
fn write_output(mut output: OutputBlob, bytes: u64) -> Value {
    let block = [b'x'; 64 * 1024];
    let mut remaining = bytes;
    let mut result = Ok(());
    while remaining > 0 && result.is_ok() {
        let count = remaining.min(block.len() as u64) as usize;
        result = output.write_all(&block[..count]);
        remaining -= count as u64;
    }
    let result = result.and_then(|()| output.flush());

    json!({
        "requested": bytes,
        "accepted": output.bytes_written(),
        "error": result.err().map(|error| error.to_string()),
    })
}

/// Returns a JSON string whose encoding, two quotes included, is `bytes` bytes long.
fn big_result(bytes: u64) -> Value {
    let content_len = usize::try_from(bytes.saturating_sub(2)).unwrap_or(usize::MAX);
    Value::String("x".repeat(content_len))
}

fn print_lines(lines: u64) -> Value {
    for line in 0..lines {
        println!("hostile guest stdout line {line}");
        eprintln!("hostile guest stderr line {line}");
    }
    json!({ "lines": lines })
}

fn message_or_default(message: Option<String>, kind: &str) -> String {
    message.unwrap_or_else(|| format!("hostile guest returned {kind} on purpose"))
}

bgw_guest::export_activity!(hostile);

// Native tests: `cargo test -p hostile --target x86_64-unknown-linux-gnu`.
#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(payload: Value) -> std::result::Result<Mode, serde_json::Error> {
        Mode::deserialize(&payload)
    }

    #[test]
    fn modes_parse_with_defaults() {
        let recurse = mode_of(json!({ "mode": "recurse" })).unwrap();
        assert!(matches!(recurse, Mode::Recurse { depth: 1_000_000 }));

        let sleep = mode_of(json!({ "mode": "sleep", "ms": 5 })).unwrap();
        assert!(matches!(sleep, Mode::Sleep { ms: 5 }));

        let spin = mode_of(json!({ "mode": "spin", "unused": true })).unwrap();
        assert!(matches!(spin, Mode::Spin));
    }

    #[test]
    fn unknown_mode_is_rejected() {
        let error = mode_of(json!({ "mode": "explode" })).err().unwrap();
        assert!(
            error.to_string().contains("unknown variant `explode`"),
            "{error}"
        );
    }

    #[test]
    fn shallow_recursion_returns_depth() {
        assert_eq!(recurse(1000), 1000);
    }

    #[test]
    fn big_result_encodes_to_requested_size() {
        let encoded = serde_json::to_string(&big_result(1000)).unwrap();
        assert_eq!(encoded.len(), 1000);
    }
}

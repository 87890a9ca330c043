//! The `bgw:activity/host` interface: what a guest may reach of its own task.

use std::sync::atomic::Ordering;

use super::TaskState;

pub(crate) mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "activity",
        exports: { default: async },
    });
}

use bindings::bgw::activity::host::Host;
use bindings::bgw::activity::types::{Host as TypesHost, LogLevel};

/// Largest chunk one `read-input` call returns, so a guest cannot make the host allocate
/// more than this at once.
const MAX_READ_CHUNK: u32 = 1024 * 1024;

impl TypesHost for TaskState {}

impl Host for TaskState {
    fn log(&mut self, level: LogLevel, message: String, fields: Vec<(String, String)>) {
        let level = match level {
            LogLevel::Trace => "TRACE",
            LogLevel::Debug => "DEBUG",
            LogLevel::Info => "INFO",
            LogLevel::Warn => "WARN",
            LogLevel::Error => "ERROR",
        };
        let mut line = format!("{level} {message}");
        for (key, value) in fields {
            line.push_str(&format!(" {key}={value:?}"));
        }
        line.push('\n');
        self.log.push(line.as_bytes());
    }

    fn progress(&mut self, percent: u8, message: String) {
        let percent = percent.min(100);
        let message: String = message.chars().take(200).collect();
        *self.progress.lock().unwrap_or_else(|e| e.into_inner()) = Some((percent, message));
    }

    fn input_size(&mut self) -> Option<u64> {
        self.input.as_ref().map(|(_, size)| *size)
    }

    fn read_input(&mut self, offset: u64, max_len: u32) -> Result<Vec<u8>, String> {
        let Some((reader, size)) = self.input.as_ref() else {
            return Err("this task has no input blob".to_owned());
        };
        if offset >= *size {
            return Ok(Vec::new());
        }
        let len = u64::from(max_len.min(MAX_READ_CHUNK)).min(size - offset) as usize;
        let mut buffer = vec![0; len];
        let mut filled = 0;
        while filled < len {
            match reader.read_at(offset + filled as u64, &mut buffer[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(error) => return Err(format!("failed to read the input blob: {error}")),
            }
        }
        buffer.truncate(filled);
        Ok(buffer)
    }

    fn write_output(&mut self, data: Vec<u8>) -> Result<(), String> {
        let written = self.output_written.load(Ordering::Relaxed);
        let total = written + data.len() as u64;
        if total > self.max_output_bytes {
            return Err(format!(
                "output limit exceeded: writing {} more bytes would make the output blob {total} bytes, over the limit of {} bytes (set with `bgw register --max-output`)",
                data.len(),
                self.max_output_bytes
            ));
        }
        if self.output.is_none() {
            let writer = (self.open_output)()
                .map_err(|error| format!("failed to open the output blob: {error:#}"))?;
            self.output = Some(writer);
        }
        let writer = self.output.as_mut().expect("opened above");
        writer
            .write_all(&data)
            .map_err(|error| format!("failed to write the output blob: {error}"))?;
        self.output_written.store(total, Ordering::Relaxed);
        Ok(())
    }

    fn is_cancelled(&mut self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }
}

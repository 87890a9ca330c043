//! Shared helpers of the integration tests: where the example guests are, and a test
//! environment that runs the real `bgw` binary on a temporary data directory.

#![allow(dead_code)]

use std::path::PathBuf;

/// Directory of the built example guests: `BGW_GUEST_DIR`, or the shared target directory.
pub fn guest_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("BGW_GUEST_DIR") {
        return PathBuf::from(dir);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("wasm32-wasip2/release")
}

/// Path of one built guest, e.g. `guest("multiply")`. Panics with the build command when
/// the guest is missing, so a test never passes without its component.
pub fn guest(name: &str) -> PathBuf {
    let path = guest_dir().join(format!("{}.wasm", name.replace('-', "_")));
    assert!(
        path.is_file(),
        "guest component {} is missing: build the guests with `examples/build` first",
        path.display()
    );
    path
}

/// Reads one built guest's bytes.
pub fn guest_bytes(name: &str) -> Vec<u8> {
    std::fs::read(guest(name)).expect("failed to read the guest component")
}

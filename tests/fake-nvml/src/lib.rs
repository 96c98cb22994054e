//! fake-nvml: a stand-in for `libnvidia-ml.so.1`, so vramd's NVML backend can
//! be tested on machines without a GPU.
//!
//! The crate builds two things:
//! - a cdylib, `target/<profile>/libfake_nvml.so`, exporting the handful of
//!   NVML functions vramd uses (see [`ffi`]) with NVML's exact C ABI. Load it
//!   with `Nvml::builder().lib_path(path).init()`, or run
//!   `FAKE_NVML_STATE=/path/state.json vramd --nvml-lib target/debug/libfake_nvml.so`.
//! - an rlib with the [`State`] types, so tests can write the JSON state file
//!   that drives the fake ([`State::write_atomic`]).
//!
//! The fake re-reads the file named by [`STATE_ENV`] on every call, so a test
//! changes the machine under a running daemon by rewriting that file. The
//! format is documented in this crate's `README.md`.

pub mod ffi;
mod state;

use std::path::{Path, PathBuf};

pub use state::{
    DEFAULT_DRIVER_VERSION, DeviceFailure, FakeDevice, FakeProcess, InitError, STATE_ENV, State,
};

/// File name of the built cdylib.
pub const CDYLIB_FILE_NAME: &str = "libfake_nvml.so";

/// Finds the built cdylib for an executable in a cargo target directory:
/// the copy beside `exe` (a test in `target/<profile>/deps/`), else the one
/// in the parent directory (`target/<profile>/`, where `cargo build` puts
/// it). Returns the first candidate that exists, or `None`.
pub fn find_cdylib_near(exe: &Path) -> Option<PathBuf> {
    let dir = exe.parent()?;
    // target/<profile>/deps/ first: a test build always refreshes that copy,
    // while the uplifted one in target/<profile>/ is only refreshed by
    // `cargo build` and may be stale.
    [Some(dir), dir.parent()]
        .into_iter()
        .flatten()
        .map(|dir| dir.join(CDYLIB_FILE_NAME))
        .find(|candidate| candidate.is_file())
}

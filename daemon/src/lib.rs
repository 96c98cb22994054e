//! The vramd daemon as a library: the ledger (pure scheduling and accounting),
//! the GPU backends, and the socket server. The `vramd` and `vramctl`
//! binaries are thin wrappers over it.

pub mod config;
pub mod consumers;
pub mod gpu;
pub mod ledger;
pub mod server;

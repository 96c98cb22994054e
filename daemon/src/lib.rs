//! The vramd daemon as a library: start-up wiring ([`start`]), the GPU
//! backends ([`gpu`]), external consumers ([`consumers`], from the
//! [`config`] file) and the socket server ([`server`]) around the pure
//! ledger (the `vramd-ledger` crate). The `vramd` binary only parses its
//! arguments and calls [`start::run`].

pub mod config;
pub mod consumers;
pub mod gpu;
pub mod mps;
pub mod server;
pub mod start;
pub mod state;

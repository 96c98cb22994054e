//! The vramd daemon as a library: start-up wiring ([`start`]), the
//! [`config`] file, the GPU backends ([`gpu`]) and the socket server
//! ([`server`]) around the pure ledger (the `vramd-ledger` crate). It
//! speaks only its socket protocol and reads the GPUs: no HTTP (apps that
//! load on their own are vramd-gateway's). The `vramd` binary only parses
//! its arguments and calls [`start::run`].

pub mod config;
pub mod gpu;
pub mod mps;
pub mod server;
pub mod start;
pub mod state;

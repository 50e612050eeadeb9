//! Integration tests: real PostgreSQL (a fresh database per test) and the Batch-compatible
//! emulator on loopback. One binary, so the crate and its dependencies link once.

mod harness;

mod cli;
mod daemon;
mod delivery;
mod lifecycle;
mod segment;
mod sync;
mod traits;

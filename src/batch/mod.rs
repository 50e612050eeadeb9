//! Batch's Profile API: its limits, the operation encoding, the client with its retry policy and
//! rate limiter, and a local Batch-compatible server (the emulator) for tests and the demo.

pub mod client;
pub mod emulator;
pub mod limits;
pub mod operation;
pub mod retry;

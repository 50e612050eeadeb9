//! engage-sync: keeps Batch profiles in step with audiences and computed traits defined as SQL,
//! and forwards Segment-style identify/track calls to Batch.
//!
//! The data path is `config` → `source` (staging) → `diff` (outbox) → `deliver` (Batch) → snapshot;
//! Segment messages enter the same outbox through `ingest` / `replay` → `forward` (`segment` maps).
//! See `docs/ARCHITECTURE.md` for the whole picture and the invariant that makes it crash-safe.

pub mod admin;
pub mod batch;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod db;
pub mod deliver;
pub mod demo;
pub mod diff;
pub mod domain;
pub mod forward;
pub mod ingest;
pub mod local_pg;
pub mod outbox;
pub mod progress;
pub mod replay;
pub mod segment;
pub mod source;
pub mod status;
pub mod sync;
pub mod telemetry;

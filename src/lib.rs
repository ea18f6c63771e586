//! Berth: an OCI container registry where deleting is safe.
//!
//! Modules follow the data's way through the system:
//!
//! * [`api`] — HTTP: routes, request parsing, the OCI error table, the request log.
//! * [`registry`] — the domain operations (push, pull, list); the only place that composes
//!   metadata and storage.
//! * [`meta`] — the transactional metadata store (SQLite or PostgreSQL).
//! * [`blob`] — content-addressed blob storage with never-reused keys.
//! * [`oci`] — pure types: digests, names, references, manifest parsing.
//! * [`auth`] — who is calling (htpasswd, bearer tokens) and what they may do.
//! * [`retention`] — retention rules and immutable tags, and the pure decision of what the rules
//!   remove.
//! * [`upstream`] — the client a pull-through cache reads its upstream registry with.
//! * [`config`], [`app`], [`server`], [`cli`], [`telemetry`] — wiring.
//!
//! Dependencies run one way: `api → registry → {meta, blob} → oci`. Only `meta` touches sqlx and
//! only `blob` touches storage.

#![warn(missing_docs, unreachable_pub)]

pub mod admin;
pub mod api;
pub mod app;
pub mod auth;
pub mod backup;
pub mod blob;
pub mod cli;
pub mod config;
pub mod distribution;
pub mod events;
pub mod fuzzing;
pub mod memory;
pub mod meta;
pub mod metrics;
pub mod oci;
pub mod quota;
pub mod registry;
pub mod retention;
pub mod server;
pub mod telemetry;
pub mod time;
pub mod ui;
pub mod upstream;

//! Berth's integration tests: one binary, every test against a real server on an ephemeral port.

mod harness;

mod access;
mod admin;
mod api;
pub mod auth;
mod backup;
mod blobs;
mod bulk_restore;
mod cli;
mod crash;
mod deletes;
mod discovery;
pub mod e2e;
mod events;
mod explain;
mod faults;
mod fsck;
pub mod gc;
mod in_use;
mod limits;
mod manifests;
mod metrics;
pub mod proxy;
mod quotas;
mod replicas;
pub mod retention;
pub mod revive;
mod soak;
mod sweep;
mod tags;
mod tls;
mod upgrade;

//! The production node process (`keel node start`, DESIGN.md §6 and §9):
//! QUIC + mutual TLS, redb files and the system clock around the same node
//! runtime the simulator runs.
//!
//! A node's data directory holds its database (`keel.redb`) and its
//! credentials (`identity.cred`: node id, certificate and key, trusted CAs
//! and the cluster CA it signs joiners with). The first start either
//! bootstraps a cluster or joins one with a token; every later start
//! restarts from the directory.

pub mod cluster_dir;
pub mod config;
mod credentials;
pub mod files;
mod run;

pub use run::{run, DaemonError};

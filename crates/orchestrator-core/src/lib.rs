//! The supervising engine of orchestrator: configuration, discovery, process
//! spawning, the per-service actors and the supervisor that owns them. No CLI,
//! no sockets, no printing: the binary wires those around it.

pub mod cgroup;
pub mod config;
pub mod daemon;
pub mod deps;
pub mod discovery;
pub mod events;
pub mod export;
pub mod guardian;
pub mod handover;
pub mod health;
pub mod memory;
pub mod name;
pub mod notify;
pub mod output;
pub mod plan;
pub mod process;
pub mod reload;
pub mod service;
pub mod state;
pub mod supervisor;
pub mod systemd;
pub mod usage;
pub mod validate;
pub mod watch;
pub mod wire;

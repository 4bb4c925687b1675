//! The control plane: an HTTP/1.1 + JSON API on the daemon's Unix socket
//! (and optionally on TCP with a token), the client the CLI uses, and the
//! Prometheus metrics.

pub mod client;
pub mod control;
pub mod metrics;
pub mod server;

//! The control plane: an HTTP/1.1 + JSON API on the daemon's Unix socket
//! (and optionally on TCP with a token), the client the CLI uses, and the
//! Prometheus metrics.

pub mod client;
pub mod control;
pub mod metrics;
pub mod server;

use serde::{Deserialize, Serialize};

/// Every error on the wire: a message for people, a code for programs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    pub code: String,
}

/// One record of a logs response (newline-delimited JSON): a line, or a
/// note that a slow follower missed some.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LogRecord {
    Line {
        seq: u64,
        time: String,
        stream: String,
        /// Lossy UTF-8; the log file keeps the raw bytes.
        text: String,
    },
    Skipped {
        skipped: u64,
    },
}

//! One service: its pure state machine and the actor task that owns it.

mod actor;
mod inbox;
mod machine;
#[cfg(test)]
mod tests;

pub use actor::{ServiceDefinition, ServiceError, ServiceHandle, ServiceStatus, spawn_service};
pub use machine::{BACKOFF_JITTER, Effect, Input, Machine, Policy, State};

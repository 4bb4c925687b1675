//! One service: its pure state machine and the actor task that owns it.

mod actor;
mod inbox;
mod machine;
#[cfg(test)]
pub(crate) mod tests;

pub use actor::{
    Resources, ServiceDefinition, ServiceError, ServiceHandle, ServiceStatus, service_actor,
    service_actor_resumed, spawn_service,
};
pub use machine::{BACKOFF_JITTER, Effect, Input, Machine, Policy, ReadyWhen, State};

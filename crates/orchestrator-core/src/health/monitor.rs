//! The task that runs a service's health check on its schedule (filled by the health work).

//! Configuration: the validated model, loading TOML with line numbers, and
//! validation that reports every problem at once.

mod error;
mod load;
mod model;

pub use error::{ConfigErrors, ConfigProblem, Locations};
pub use load::{
    HostPaths, Loaded, depends_on_key, load, load_all, load_daemon_settings, parse, parse_all,
    parse_in, parse_located, service_key,
};
pub use model::*;

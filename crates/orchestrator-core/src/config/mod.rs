//! Configuration: the validated model, loading TOML with line numbers, and
//! validation that reports every problem at once.

mod error;
mod load;
mod model;

pub use error::{ConfigErrors, ConfigProblem, Locations};
pub use load::{load, load_located, parse, parse_located};
pub use model::*;

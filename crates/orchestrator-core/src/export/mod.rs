//! `orchestrator export`: the effective service definitions (after
//! defaults, env files, `${VAR}` and instances) as another engine's files,
//! and a list of what does not carry over.
//!
//! Each target is a pure function from definitions to files: nothing here
//! reads the host or writes anywhere, so the output is the same on every
//! machine for the same definitions (the golden tests rely on it).

pub mod kubernetes;
pub mod nomad;
pub mod systemd;

use std::fmt;

use crate::health::{HealthCheck, Probe};
use crate::service::ServiceDefinition;

/// One file of an export, its path relative to the output directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportFile {
    pub path: String,
    pub contents: String,
}

/// A setting the target has no equivalent for, and what was done instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Untranslated {
    pub service: String,
    /// The configuration key, as written in the file (`health`, `sha256`).
    pub key: String,
    pub action: Action,
    /// What the target does instead, or why nothing is.
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Left out: the target has nothing like it.
    Dropped,
    /// Written as the nearest setting, which behaves differently.
    Approximated,
}

impl fmt::Display for Untranslated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let action = match self.action {
            Action::Dropped => "dropped",
            Action::Approximated => "approximated",
        };
        write!(
            f,
            "{}: {} {action}: {}",
            self.service, self.key, self.detail
        )
    }
}

/// What an export produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Export {
    pub files: Vec<ExportFile>,
    pub untranslated: Vec<Untranslated>,
}

impl Export {
    fn file(&mut self, path: String, contents: String) {
        self.files.push(ExportFile { path, contents });
    }

    /// The notes from `from` on, each said once: the instances of a
    /// section (one workload elsewhere) give the same notes.
    fn dedupe_notes(&mut self, from: usize) {
        let notes: Vec<Untranslated> = self.untranslated.drain(from..).collect();
        for note in notes {
            if !self.untranslated.contains(&note) {
                self.untranslated.push(note);
            }
        }
    }

    fn note(&mut self, service: &str, key: &str, action: Action, detail: impl Into<String>) {
        self.untranslated.push(Untranslated {
            service: service.to_owned(),
            key: key.to_owned(),
            action,
            detail: detail.into(),
        });
    }
}

/// One workload per service, and one per section with instances (its
/// members in index order): a Deployment, a Nomad group.
fn workloads(definitions: &[ServiceDefinition]) -> Vec<(String, Vec<&ServiceDefinition>)> {
    let (alone, groups) = group_instances(definitions);
    let mut workloads: Vec<(String, Vec<&ServiceDefinition>)> = alone
        .into_iter()
        .map(|definition| (definition.name.to_string(), vec![definition]))
        .collect();
    workloads.extend(groups);
    workloads
}

/// A duration as systemd and Nomad read it: whole seconds, or milliseconds.
fn duration_text(d: std::time::Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// What waiting for `dependency` can wait on elsewhere: the workload it
/// belongs to (its section, for an instance) and the port its health check
/// names; `None` when the check names no port (nothing to connect to).
fn dependency_endpoint(
    dependency: &crate::deps::Dependency,
    all: &[ServiceDefinition],
) -> Option<(String, u16)> {
    let target = all.iter().find(|d| d.name == dependency.name)?;
    let port = target.health.as_deref().and_then(probe_port)?;
    let workload = target
        .name
        .instance_of()
        .map_or(target.name.as_str(), |(section, _)| section);
    Some((workload.to_owned(), port))
}

/// The port a health check talks to, if it names one (http defaults to 80).
fn probe_port(health: &HealthCheck) -> Option<u16> {
    let address = match &health.probe {
        Probe::Http { url, .. } => {
            let authority = url.strip_prefix("http://")?.split('/').next()?;
            return match authority.rsplit_once(':') {
                Some((_, port)) => port.parse().ok(),
                None => Some(80),
            };
        }
        Probe::Tcp { address } | Probe::Grpc { address, .. } => address,
        Probe::Exec { .. } => return None,
    };
    address.rsplit_once(':')?.1.parse().ok()
}

/// The services of `definitions` that run as instances of one section,
/// grouped: (section, its instances in index order); and the others alone.
fn group_instances(
    definitions: &[ServiceDefinition],
) -> (
    Vec<&ServiceDefinition>,
    Vec<(String, Vec<&ServiceDefinition>)>,
) {
    let mut alone = Vec::new();
    let mut groups: Vec<(String, Vec<(u32, &ServiceDefinition)>)> = Vec::new();
    for definition in definitions {
        match definition.name.instance_of() {
            Some((section, index)) => match groups.iter_mut().find(|(s, _)| s == section) {
                Some((_, members)) => members.push((index, definition)),
                None => groups.push((section.to_owned(), vec![(index, definition)])),
            },
            None => alone.push(definition),
        }
    }
    let groups = groups
        .into_iter()
        .map(|(section, mut members)| {
            members.sort_by_key(|(index, _)| *index);
            (section, members.into_iter().map(|(_, d)| d).collect())
        })
        .collect();
    (alone, groups)
}

#[cfg(test)]
mod tests;

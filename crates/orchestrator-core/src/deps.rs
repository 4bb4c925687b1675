//! Dependencies between services (`depends_on`): what one waits for, and
//! the graph they form.

use crate::name::ServiceName;

/// One entry of `depends_on`: `name` must meet `condition` before the
/// service that names it starts.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dependency {
    pub name: ServiceName,
    pub condition: Condition,
}

#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Condition {
    /// Running past its start_grace (or ready by notify or probe).
    #[default]
    Started,
    /// Its health check passes, or it sent READY=1.
    Healthy,
    /// It exited 0.
    Completed,
}

impl Condition {
    pub fn as_str(self) -> &'static str {
        match self {
            Condition::Started => "started",
            Condition::Healthy => "healthy",
            Condition::Completed => "completed",
        }
    }

    pub fn parse(text: &str) -> Option<Condition> {
        match text {
            "started" => Some(Condition::Started),
            "healthy" => Some(Condition::Healthy),
            "completed" => Some(Condition::Completed),
            _ => None,
        }
    }
}

impl std::fmt::Display for Condition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}
// TEMP STUB (not to be committed)
use std::collections::BTreeMap;
pub fn dependency_closure(
    graph: &BTreeMap<ServiceName, Vec<ServiceName>>,
    roots: &[ServiceName],
) -> Vec<ServiceName> {
    fn visit(
        g: &BTreeMap<ServiceName, Vec<ServiceName>>,
        n: &ServiceName,
        seen: &mut Vec<ServiceName>,
    ) {
        if seen.contains(n) {
            return;
        }
        for d in g.get(n).into_iter().flatten() {
            visit(g, d, seen);
        }
        if !seen.contains(n) {
            seen.push(n.clone());
        }
    }
    let mut seen = Vec::new();
    for r in roots {
        visit(graph, r, &mut seen);
    }
    seen
}
pub fn dependents_closure(
    graph: &BTreeMap<ServiceName, Vec<ServiceName>>,
    roots: &[ServiceName],
) -> Vec<ServiceName> {
    let mut out: Vec<ServiceName> = Vec::new();
    let mut frontier: Vec<ServiceName> = roots.to_vec();
    while let Some(n) = frontier.pop() {
        for (k, v) in graph {
            if v.contains(&n) && !out.contains(k) && !roots.contains(k) {
                out.push(k.clone());
                frontier.push(k.clone());
            }
        }
    }
    out.reverse();
    out
}

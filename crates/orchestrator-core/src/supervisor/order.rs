//! Starting and stopping in dependency order (`depends_on`). The graph is
//! read from the current definitions at each call; the waiting happens in
//! the caller's tasks, on the services' status channels, so neither the
//! supervisor nor any actor ever blocks on another service.
//!
//! - A start starts what its services depend on first (transitively), each
//!   dependency only if it does not already meet what is asked of it;
//!   independent services start in parallel, each as soon as its own
//!   dependencies are met. A service waiting shows `starting` with the
//!   reason ("waiting for db (healthy)").
//! - A dependency that is restarting (a backoff) is waited for; one that
//!   failed, or stopped without meeting the condition, leaves its
//!   dependents not started, each saying why.
//! - An ordered stop stops each service once every service that depends
//!   on it has stopped.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinSet;

use super::{SupervisorError, SupervisorHandle};
use crate::deps::{Condition, Dependency, Graph};
use crate::name::ServiceName;
use crate::service::{ServiceDefinition, ServiceError, ServiceHandle, ServiceStatus, State};
use crate::wire::Health;

/// One service as the ordering sees it.
#[derive(Clone)]
pub(super) struct Member {
    pub(super) handle: ServiceHandle,
    pub(super) definition: Arc<ServiceDefinition>,
}

/// Who asked for a start: a user's is counted as such, the daemon's (and
/// every dependency started on a start's behalf) is not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartedBy {
    User,
    Daemon,
}

fn graph_of(members: &BTreeMap<ServiceName, Member>) -> Graph {
    members
        .iter()
        .map(|(name, member)| {
            let deps = member
                .definition
                .depends_on
                .iter()
                .map(|dependency| dependency.name.clone())
                .collect();
            (name.clone(), deps)
        })
        .collect()
}

/// Whether a dependency's status meets `condition` now, may later, or
/// never will without someone acting.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Met,
    Wait,
    Never(String),
}

fn verdict(
    dependency: &Dependency,
    definition: &ServiceDefinition,
    status: &ServiceStatus,
) -> Verdict {
    let name = &dependency.name;
    if status.state == State::Failed {
        let error = status.last_error.as_deref().unwrap_or("it gave up");
        return Verdict::Never(format!("{name} failed: {error}"));
    }
    let exited_ok = status.last_exit.is_some_and(|exit| exit.is_success());
    match dependency.condition {
        Condition::Completed => {
            if status.pid.is_none() && exited_ok {
                Verdict::Met
            } else if status.state == State::Stopped {
                match status.last_exit {
                    Some(exit) => Verdict::Never(format!("{name} {exit}")),
                    None => Verdict::Never(format!("{name} is stopped")),
                }
            } else {
                Verdict::Wait
            }
        }
        Condition::Started | Condition::Healthy => {
            let up = status.state == State::Running;
            let healthy = definition.health.is_none() || status.health == Some(Health::Healthy);
            if up && (dependency.condition == Condition::Started || healthy) {
                Verdict::Met
            } else if status.state == State::Stopped {
                Verdict::Never(match status.last_exit {
                    Some(exit) if exited_ok => format!("{name} {exit} and is not running"),
                    Some(exit) => format!("{name} {exit}"),
                    None => format!("{name} is stopped"),
                })
            } else {
                Verdict::Wait
            }
        }
    }
}

/// Wait until `dependency` meets its condition; `Err` with why when it
/// cannot any more.
async fn wait_for(dependency: &Dependency, member: &Member) -> Result<(), String> {
    let mut status = member.handle.subscribe();
    loop {
        let verdict = verdict(dependency, &member.definition, &status.borrow_and_update());
        match verdict {
            Verdict::Met => return Ok(()),
            Verdict::Never(why) => return Err(why),
            Verdict::Wait => {}
        }
        if status.changed().await.is_err() {
            return Err(format!("{} was removed", dependency.name));
        }
    }
}

impl SupervisorHandle {
    pub(super) async fn members(&self) -> Result<BTreeMap<ServiceName, Member>, SupervisorError> {
        self.ask(super::Command::Members).await
    }

    /// Start `roots` in dependency order (see the module's doc). Returns
    /// each root's outcome, in the order given; unknown roots are errors.
    pub async fn start_ordered(
        &self,
        roots: &[ServiceName],
        by: StartedBy,
    ) -> Result<Vec<(ServiceName, Result<(), ServiceError>)>, SupervisorError> {
        let members = self.members().await?;
        for root in roots {
            if !members.contains_key(root) {
                return Err(SupervisorError::UnknownService(root.to_string()));
            }
        }
        let graph = graph_of(&members);
        let order = crate::deps::dependency_closure(&graph, roots);
        let roots: BTreeSet<&ServiceName> = roots.iter().collect();
        // What the services in this start ask of each dependency: one that
        // meets all of it already is left alone (a completed migration is
        // not run again).
        let mut asked: BTreeMap<ServiceName, Vec<Dependency>> = BTreeMap::new();
        for name in &order {
            for dependency in members
                .get(name)
                .map(|m| &m.definition.depends_on)
                .into_iter()
                .flatten()
            {
                asked
                    .entry(dependency.name.clone())
                    .or_default()
                    .push(dependency.clone());
            }
        }
        let mut done: BTreeMap<ServiceName, watch::Receiver<bool>> = BTreeMap::new();
        let mut tasks = JoinSet::new();
        // A root that depends on nothing and that nothing here waits for
        // (most services, all of them without depends_on): its request goes
        // out now and its answer is collected below, with no task, channel
        // or guard of its own — a thousand short-lived tasks at start-up
        // would leave the daemon's heap larger for good.
        let mut direct = Vec::new();
        for name in order {
            let Some(member) = members.get(&name).cloned() else {
                continue;
            };
            let is_root = roots.contains(&name);
            if is_root && member.definition.depends_on.is_empty() && !asked.contains_key(&name) {
                direct.push((name, member.handle.start_by(by == StartedBy::User)));
                continue;
            }
            let dependencies: Vec<(Dependency, Member, Option<watch::Receiver<bool>>)> = member
                .definition
                .depends_on
                .iter()
                .filter_map(|dependency| {
                    let target = members.get(&dependency.name)?.clone();
                    Some((
                        dependency.clone(),
                        target,
                        done.get(&dependency.name).cloned(),
                    ))
                })
                .collect();
            let (finished, receiver) = watch::channel(false);
            done.insert(name.clone(), receiver);
            let asked_of_it = asked.remove(&name).unwrap_or_default();
            tasks.spawn(async move {
                let result = start_member(&member, dependencies, is_root, &asked_of_it, by).await;
                // Dependents wait for this: a dependency's start is tried
                // before its status is judged.
                let _ = finished.send(true);
                (name, is_root, result)
            });
        }
        let mut outcomes = BTreeMap::new();
        for (name, start) in direct {
            outcomes.insert(name, start.await);
        }
        while let Some(joined) = tasks.join_next().await {
            if let Ok((name, true, result)) = joined {
                outcomes.insert(name, result);
            }
        }
        Ok(roots
            .into_iter()
            .map(|root| {
                let result = outcomes.remove(root).unwrap_or(Ok(()));
                (root.clone(), result)
            })
            .collect())
    }

    /// Stop `names` (all of them when `None`) with `stop`, each once every
    /// service depending on it (among those stopped here) is down; the rest
    /// in parallel. Returns when all are done.
    pub async fn stop_ordered<F, Fut>(
        &self,
        names: Option<&[ServiceName]>,
        stop: F,
    ) -> Result<(), SupervisorError>
    where
        F: Fn(&ServiceHandle) -> Fut + Clone + Send + 'static,
        Fut: std::future::Future<Output = Result<(), ServiceError>> + Send + 'static,
    {
        let mut members = self.members().await?;
        // Who must stop before each service: those of the set that depend
        // on it; for a part of the services, also through services left
        // out of it (web -> api -> db, stopping web and db: db waits for web).
        let mut dependents: BTreeMap<ServiceName, Vec<ServiceName>> = BTreeMap::new();
        match names {
            Some(names) => {
                let graph = graph_of(&members);
                let keep: BTreeSet<&ServiceName> = names.iter().collect();
                members.retain(|name, _| keep.contains(name));
                for name in members.keys() {
                    let waits = crate::deps::dependents_closure(&graph, std::slice::from_ref(name))
                        .into_iter()
                        .filter(|dependent| keep.contains(dependent))
                        .collect();
                    dependents.insert(name.clone(), waits);
                }
            }
            None => {
                for (name, member) in &members {
                    for dependency in &member.definition.depends_on {
                        if members.contains_key(&dependency.name) {
                            dependents
                                .entry(dependency.name.clone())
                                .or_default()
                                .push(name.clone());
                        }
                    }
                }
            }
        }
        let mut done = BTreeMap::new();
        let mut senders = Vec::new();
        for name in members.keys() {
            let (sender, receiver) = watch::channel(false);
            done.insert(name.clone(), receiver);
            senders.push(sender);
        }
        let mut tasks = JoinSet::new();
        for ((name, member), finished) in members.into_iter().zip(senders) {
            let waits: Vec<watch::Receiver<bool>> = dependents
                .get(&name)
                .into_iter()
                .flatten()
                .filter_map(|dependent| done.get(dependent).cloned())
                .collect();
            let handle = member.handle.clone();
            let stop = stop.clone();
            tasks.spawn(async move {
                for mut wait in waits {
                    // A dropped sender is a dependent whose stop ended too.
                    let _ = wait.wait_for(|finished| *finished).await;
                }
                // `stop` sends its request when called (not when awaited):
                // under the lock, so no ordered start crosses it.
                let stopping = handle.resources().cancel_then(|| stop(&handle));
                let result = stopping.await;
                let _ = finished.send(true);
                if let Err(error) = result {
                    tracing::warn!("{error}");
                }
            });
        }
        while tasks.join_next().await.is_some() {}
        Ok(())
    }

    /// Stop the services that depend on `name` (transitively; dependents
    /// first), restart `name`, then start them again in order. Returns
    /// `name`'s outcome; a dependent that cannot start again is reported
    /// in its own status.
    pub async fn restart_with_dependents(&self, name: &str) -> Result<(), SupervisorError> {
        let members = self.members().await?;
        let Some((root, member)) = members.iter().find(|(n, _)| n.as_str() == name) else {
            return Err(SupervisorError::UnknownService(name.to_owned()));
        };
        let graph = graph_of(&members);
        let dependents: Vec<ServiceName> =
            crate::deps::dependents_closure(&graph, std::slice::from_ref(root))
                .into_iter()
                .filter(|dependent| {
                    members.get(dependent).is_some_and(|m| {
                        m.handle.status().state != State::Stopped
                            && m.handle.status().state != State::Failed
                    })
                })
                .collect();
        self.stop_ordered(Some(&dependents), ServiceHandle::stop_request)
            .await?;
        member.handle.restart().await?;
        if !dependents.is_empty() {
            for (dependent, result) in self.start_ordered(&dependents, StartedBy::User).await? {
                if let Err(error) = result {
                    tracing::warn!(service = %dependent, "not started again after {name}'s restart: {error}");
                }
            }
        }
        Ok(())
    }
}

async fn start_member(
    member: &Member,
    dependencies: Vec<(Dependency, Member, Option<watch::Receiver<bool>>)>,
    is_root: bool,
    asked_of_it: &[Dependency],
    by: StartedBy,
) -> Result<(), ServiceError> {
    let resources = member.handle.resources();
    let epoch = resources.begin_waiting();
    // Dropped (the request's connection closed, the daemon's start-up
    // abandoned) or done: what it said it waits for is no longer true.
    let _clear = ClearWaiting { member, epoch };
    let stopped = || ServiceError::Superseded {
        service: member.definition.name.to_string(),
        by: "stop",
    };
    for (dependency, target, finished) in dependencies {
        resources.set_waiting(
            epoch,
            Some(format!(
                "waiting for {} ({})",
                dependency.name, dependency.condition
            )),
        );
        if let Some(mut finished) = finished {
            let _ = finished.wait_for(|finished| *finished).await;
        }
        if let Err(why) = wait_for(&dependency, &target).await {
            let error = ServiceError::DependencyFailed {
                service: member.definition.name.to_string(),
                dependency: dependency.name.to_string(),
                condition: dependency.condition,
                reason: why,
            };
            resources.set_waiting(epoch, Some(format!("not started: {error}")));
            std::mem::forget(_clear);
            return Err(error);
        }
        if !resources.still_wanted(epoch) {
            return Err(stopped());
        }
    }
    resources.set_waiting(epoch, None);
    if !is_root {
        let status = member.handle.status();
        let all_met = !asked_of_it.is_empty()
            && asked_of_it
                .iter()
                .all(|dependency| verdict(dependency, &member.definition, &status) == Verdict::Met);
        // A dependency in its backoff restarts on its own: starting it now
        // would reset its failure count, and a crash loop would never end
        // in `failed` for its dependents to see.
        if all_met
            || matches!(
                status.state,
                State::Restarting | State::Starting | State::Stopping
            )
        {
            return Ok(());
        }
    }
    let user = by == StartedBy::User && is_root;
    let start = resources.start_if_wanted(epoch, || member.handle.start_by(user));
    match start {
        Some(start) => start.await,
        None => Err(stopped()),
    }
}

/// Clears the waiting reason of an ordered start that ends without saying
/// more (done, stopped, or dropped mid-wait).
struct ClearWaiting<'a> {
    member: &'a Member,
    epoch: u64,
}

impl Drop for ClearWaiting<'_> {
    fn drop(&mut self) {
        self.member.handle.resources().set_waiting(self.epoch, None);
    }
}

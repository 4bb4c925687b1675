//! Dependencies between services (`depends_on`): what one waits for, and
//! the graph they form.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

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
    pub const ALL: [Condition; 3] = [Condition::Started, Condition::Healthy, Condition::Completed];

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

/// The depends_on graph as the helpers below take it: each service to the
/// services it depends on. A name that is only a target (no entry) has no
/// dependencies of its own.
pub type Graph = BTreeMap<ServiceName, Vec<ServiceName>>;

/// Past this many, `find_cycles` stops enumerating: a graph dense with
/// cycles has exponentially many, and nobody reads a thousand errors.
pub const MAX_CYCLES: usize = 64;

/// Every elementary cycle of `graph`, each once, as the services in
/// dependency order (each depends on the next, the last on the first),
/// starting from the least name; the cycles sorted. A service that depends
/// on itself is a cycle of one. At most [`MAX_CYCLES`] are enumerated;
/// beyond that, every service that is in a cycle is still in at least one
/// returned, so that each can be named.
pub fn find_cycles(graph: &Graph) -> Vec<Vec<ServiceName>> {
    let indexed = Indexed::new(graph, &[]);
    let deps = &indexed.deps;
    let mut found: Vec<Vec<usize>> = Vec::new();
    let mut in_component = vec![false; deps.len()];
    for component in components(deps) {
        let cyclic = component.len() > 1 || deps[component[0]].contains(&component[0]);
        if !cyclic {
            continue;
        }
        for &node in &component {
            in_component[node] = true;
        }
        circuits(deps, &component, &in_component, &mut found);
        cover(deps, &component, &in_component, &mut found);
        for &node in &component {
            in_component[node] = false;
        }
    }
    let mut cycles: Vec<Vec<ServiceName>> = found
        .into_iter()
        .map(|cycle| indexed.names_of(&cycle))
        .collect();
    cycles.sort();
    cycles
}

/// `roots` and everything they depend on, directly or not, each once,
/// dependencies before their dependents (the order to start them in).
pub fn dependency_closure(graph: &Graph, roots: &[ServiceName]) -> Vec<ServiceName> {
    let no_deps: &[ServiceName] = &[];
    let deps_of = |name: &ServiceName| graph.get(name).map_or(no_deps, Vec::as_slice);
    let mut seen: BTreeSet<&ServiceName> = BTreeSet::new();
    let mut out = Vec::new();
    for root in roots {
        if !seen.insert(root) {
            continue;
        }
        // Post-order, by hand: a long chain must not exhaust a task's stack.
        let mut work = vec![(root, 0)];
        while let Some(&(name, edge)) = work.last() {
            match deps_of(name).get(edge) {
                Some(dep) => {
                    if let Some(top) = work.last_mut() {
                        top.1 += 1;
                    }
                    if seen.insert(dep) {
                        work.push((dep, 0));
                    }
                }
                None => {
                    work.pop();
                    out.push(name.clone());
                }
            }
        }
    }
    out
}

/// Every service that depends on one of `roots`, directly or not, each
/// once, dependents before what they depend on (the order to stop them in
/// before the roots); the roots themselves left out.
pub fn dependents_closure(graph: &Graph, roots: &[ServiceName]) -> Vec<ServiceName> {
    let mut dependents: BTreeMap<&ServiceName, Vec<&ServiceName>> = BTreeMap::new();
    for (name, deps) in graph {
        for dep in deps {
            dependents.entry(dep).or_default().push(name);
        }
    }
    let mut reached: BTreeSet<&ServiceName> = BTreeSet::new();
    let mut todo: Vec<&ServiceName> = roots.iter().collect();
    while let Some(name) = todo.pop() {
        for &dependent in dependents.get(name).into_iter().flatten() {
            if reached.insert(dependent) {
                todo.push(dependent);
            }
        }
    }
    for root in roots {
        reached.remove(root);
    }
    let members: Vec<ServiceName> = reached.iter().map(|&name| name.clone()).collect();
    // Upside down, a service's dependents are what it "depends on": the
    // closure then puts them first, and unrelated services in name order.
    let upside_down: Graph = members
        .iter()
        .map(|name| {
            let above = dependents.get(name).into_iter().flatten();
            let kept = above.filter(|&&dependent| reached.contains(dependent));
            (
                name.clone(),
                kept.map(|&dependent| dependent.clone()).collect(),
            )
        })
        .collect();
    dependency_closure(&upside_down, &members)
}

/// `names` in groups to stop one after the other, each group all at once:
/// a service is in an earlier group than every one of `names` it depends
/// on, directly or through services not in `names`. Each group is sorted;
/// services in a cycle share a group.
pub fn stop_order_levels(graph: &Graph, names: &[ServiceName]) -> Vec<Vec<ServiceName>> {
    let indexed = Indexed::new(graph, names);
    let deps = &indexed.deps;
    let mut member = vec![false; deps.len()];
    for name in names {
        if let Some(index) = indexed.index(name) {
            member[index] = true;
        }
    }
    let components = components(deps);
    let mut component_of = vec![0; deps.len()];
    for (number, component) in components.iter().enumerate() {
        for &node in component {
            component_of[node] = number;
        }
    }
    // Components come dependencies first; walked the other way round, each
    // has its final count of stopping components above it when reached.
    let mut above = vec![0usize; components.len()];
    for (number, component) in components.iter().enumerate().rev() {
        let stopping = component.iter().any(|&node| member[node]);
        let below = above[number] + usize::from(stopping);
        for &node in component {
            for &dep in &deps[node] {
                let target = component_of[dep];
                if target != number {
                    above[target] = above[target].max(below);
                }
            }
        }
    }
    let mut levels: BTreeMap<usize, Vec<ServiceName>> = BTreeMap::new();
    for (node, &stopping) in member.iter().enumerate() {
        if stopping {
            let level = above[component_of[node]];
            levels
                .entry(level)
                .or_default()
                .push(indexed.names[node].clone());
        }
    }
    levels.into_values().collect()
}

/// The graph over indices: names sorted, so that everything built on it
/// is deterministic.
struct Indexed<'g> {
    names: Vec<&'g ServiceName>,
    /// Each node's dependencies, without repeats, in the order written.
    deps: Vec<Vec<usize>>,
}

impl<'g> Indexed<'g> {
    fn new(graph: &'g Graph, extra: &'g [ServiceName]) -> Self {
        let mut names: Vec<&ServiceName> = graph
            .iter()
            .flat_map(|(name, deps)| std::iter::once(name).chain(deps))
            .chain(extra)
            .collect();
        names.sort_unstable();
        names.dedup();
        let mut indexed = Indexed {
            deps: vec![Vec::new(); names.len()],
            names,
        };
        for (name, deps) in graph {
            let Some(from) = indexed.index(name) else {
                continue;
            };
            let mut out: Vec<usize> = Vec::with_capacity(deps.len());
            for to in deps.iter().filter_map(|dep| indexed.index(dep)) {
                if !out.contains(&to) {
                    out.push(to);
                }
            }
            indexed.deps[from] = out;
        }
        indexed
    }

    fn index(&self, name: &ServiceName) -> Option<usize> {
        self.names.binary_search(&name).ok()
    }

    fn names_of(&self, nodes: &[usize]) -> Vec<ServiceName> {
        nodes.iter().map(|&node| self.names[node].clone()).collect()
    }
}

/// Tarjan's strongly connected components, each sorted, dependencies
/// before their dependents (a component comes after every one it reaches).
fn components(deps: &[Vec<usize>]) -> Vec<Vec<usize>> {
    const UNSEEN: usize = usize::MAX;
    let mut order = vec![UNSEEN; deps.len()];
    let mut low = vec![0; deps.len()];
    let mut on_stack = vec![false; deps.len()];
    let mut stack = Vec::new();
    let mut out = Vec::new();
    let mut next = 0;
    for root in 0..deps.len() {
        if order[root] != UNSEEN {
            continue;
        }
        order[root] = next;
        low[root] = next;
        next += 1;
        stack.push(root);
        on_stack[root] = true;
        let mut work = vec![(root, 0)];
        while let Some(&(node, edge)) = work.last() {
            if let Some(&dep) = deps[node].get(edge) {
                let top = work.len() - 1;
                work[top].1 += 1;
                if order[dep] == UNSEEN {
                    order[dep] = next;
                    low[dep] = next;
                    next += 1;
                    stack.push(dep);
                    on_stack[dep] = true;
                    work.push((dep, 0));
                } else if on_stack[dep] {
                    low[node] = low[node].min(order[dep]);
                }
                continue;
            }
            work.pop();
            if let Some(&(parent, _)) = work.last() {
                low[parent] = low[parent].min(low[node]);
            }
            if low[node] == order[node] {
                let mut component = Vec::new();
                while let Some(member) = stack.pop() {
                    on_stack[member] = false;
                    component.push(member);
                    if member == node {
                        break;
                    }
                }
                component.sort_unstable();
                out.push(component);
            }
        }
    }
    out
}

/// Johnson's enumeration of the elementary cycles within `component`
/// (sorted; `in_component` marks it), each found from its least node, up
/// to [`MAX_CYCLES`] in `found`. Blocking keeps the cost to a pass over
/// the component per cycle, however many paths never close.
fn circuits(
    deps: &[Vec<usize>],
    component: &[usize],
    in_component: &[bool],
    found: &mut Vec<Vec<usize>>,
) {
    let mut blocked = vec![false; deps.len()];
    let mut unblocks: Vec<Vec<usize>> = vec![Vec::new(); deps.len()];
    for &start in component {
        if found.len() >= MAX_CYCLES {
            return;
        }
        for &node in component {
            blocked[node] = false;
            unblocks[node].clear();
        }
        let allowed = |node: usize| in_component[node] && node >= start;
        let mut path = vec![start];
        blocked[start] = true;
        // (node, next edge, whether a cycle was closed beneath it)
        let mut work = vec![(start, 0, false)];
        while let Some(&(node, edge, _)) = work.last() {
            let top = work.len() - 1;
            if let Some(&dep) = deps[node].get(edge) {
                work[top].1 += 1;
                if !allowed(dep) {
                    continue;
                }
                if dep == start {
                    found.push(path.clone());
                    if found.len() >= MAX_CYCLES {
                        return;
                    }
                    work[top].2 = true;
                } else if !blocked[dep] {
                    blocked[dep] = true;
                    path.push(dep);
                    work.push((dep, 0, false));
                }
                continue;
            }
            let (node, _, closed) = work.remove(top);
            path.pop();
            if closed {
                let mut todo = vec![node];
                while let Some(node) = todo.pop() {
                    if blocked[node] {
                        blocked[node] = false;
                        todo.append(&mut unblocks[node]);
                    }
                }
            } else {
                for &dep in &deps[node] {
                    if allowed(dep) && !unblocks[dep].contains(&node) {
                        unblocks[dep].push(node);
                    }
                }
            }
            if let Some(parent) = work.last_mut() {
                parent.2 |= closed;
            }
        }
    }
}

/// What `circuits` left out if it stopped at the cap: a shortest cycle
/// through each node of `component` that no cycle in `found` names yet.
fn cover(
    deps: &[Vec<usize>],
    component: &[usize],
    in_component: &[bool],
    found: &mut Vec<Vec<usize>>,
) {
    for &node in component {
        if found.iter().any(|cycle| cycle.contains(&node)) {
            continue;
        }
        // Breadth first from node back to itself, within the component
        // (which is strongly connected, so the way back exists).
        let mut came_from: BTreeMap<usize, usize> = BTreeMap::new();
        let mut queue = VecDeque::from([node]);
        'search: while let Some(at) = queue.pop_front() {
            for &dep in &deps[at] {
                if !in_component[dep] {
                    continue;
                }
                if dep == node {
                    let mut cycle = vec![at];
                    let mut step = at;
                    while let Some(&before) = came_from.get(&step) {
                        cycle.push(before);
                        step = before;
                    }
                    cycle.reverse();
                    // Read from node around, then started at its least node.
                    let least = cycle
                        .iter()
                        .enumerate()
                        .min_by_key(|&(_, &member)| member)
                        .map_or(0, |(position, _)| position);
                    cycle.rotate_left(least);
                    if !found.contains(&cycle) {
                        found.push(cycle);
                    }
                    break 'search;
                }
                if let Entry::Vacant(entry) = came_from.entry(dep) {
                    entry.insert(at);
                    queue.push_back(dep);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(text: &str) -> ServiceName {
        ServiceName::parse(text).unwrap()
    }

    fn names(texts: &[&str]) -> Vec<ServiceName> {
        texts.iter().map(|text| name(text)).collect()
    }

    /// "a:b,c" is a depending on b and c.
    fn graph(edges: &[&str]) -> Graph {
        edges
            .iter()
            .map(|edge| {
                let (from, to) = edge.split_once(':').unwrap_or((edge, ""));
                let deps = to.split(',').filter(|dep| !dep.is_empty()).map(name);
                (name(from), deps.collect())
            })
            .collect()
    }

    fn shown(cycles: &[Vec<ServiceName>]) -> Vec<String> {
        cycles
            .iter()
            .map(|cycle| {
                let names: Vec<&str> = cycle.iter().map(|name| name.as_str()).collect();
                names.join(" ")
            })
            .collect()
    }

    #[test]
    fn no_cycles_in_a_dag_or_an_empty_graph() {
        assert!(find_cycles(&Graph::new()).is_empty());
        let dag = graph(&["web:api,db", "api:db,cache", "db:", "worker:db,missing"]);
        assert!(find_cycles(&dag).is_empty());
    }

    #[test]
    fn a_cycle_is_named_once_from_its_least_service_in_dependency_order() {
        // c depends on a, a on b, b on c: found from a, whichever way in.
        let cycles = find_cycles(&graph(&["c:a", "a:b", "b:c", "d:c"]));
        assert_eq!(shown(&cycles), ["a b c"]);
        assert_eq!(shown(&find_cycles(&graph(&["x:x", "y:"]))), ["x"]);
        assert_eq!(shown(&find_cycles(&graph(&["a:b", "b:a,a"]))), ["a b"]);
    }

    #[test]
    fn every_elementary_cycle_of_a_tangle_and_of_separate_tangles() {
        // All three of a, b, c depend on each other: two 2-cycles each
        // way round, three pairs, and the two 3-cycles.
        let cycles = find_cycles(&graph(&["a:b,c", "b:a,c", "c:a,b"]));
        assert_eq!(shown(&cycles), ["a b", "a b c", "a c", "a c b", "b c"]);
        let cycles = find_cycles(&graph(&["p:q", "q:p", "x:y", "y:z", "z:x,y"]));
        assert_eq!(shown(&cycles), ["p q", "x y z", "y z"]);
    }

    #[test]
    fn a_graph_dense_with_cycles_is_capped_but_every_service_is_named() {
        // Every one of 12 depends on every other: millions of cycles.
        let all: Vec<String> = (0..12).map(|i| format!("s{i:02}")).collect();
        let edges: Vec<String> = all
            .iter()
            .map(|from| {
                let others: Vec<&str> = all
                    .iter()
                    .filter(|to| *to != from)
                    .map(String::as_str)
                    .collect();
                format!("{from}:{}", others.join(","))
            })
            .collect();
        let edges: Vec<&str> = edges.iter().map(String::as_str).collect();
        let cycles = find_cycles(&graph(&edges));
        assert!(cycles.len() >= MAX_CYCLES, "{}", cycles.len());
        assert!(cycles.len() <= MAX_CYCLES + all.len());
        for service in &all {
            assert!(
                cycles
                    .iter()
                    .any(|cycle| cycle.iter().any(|n| n.as_str() == service)),
                "{service} is in no reported cycle"
            );
        }
        // Each one really is a cycle, and none is reported twice.
        let dense = graph(&edges);
        for cycle in &cycles {
            for (at, next) in cycle.iter().zip(cycle.iter().cycle().skip(1)) {
                assert!(dense[at].contains(next) || cycle.len() == 1);
            }
        }
        let mut unique = cycles.clone();
        unique.dedup();
        assert_eq!(unique.len(), cycles.len());
    }

    #[test]
    fn a_long_chain_does_not_exhaust_the_stack() {
        let edges: Vec<String> = (0..50_000).map(|i| format!("s{i}:s{}", i + 1)).collect();
        let edges: Vec<&str> = edges.iter().map(String::as_str).collect();
        let chain = graph(&edges);
        assert!(find_cycles(&chain).is_empty());
        let closure = dependency_closure(&chain, &names(&["s0"]));
        assert_eq!(closure.len(), 50_001);
        assert_eq!(closure[0].as_str(), "s50000");
        assert_eq!(
            stop_order_levels(&chain, &names(&["s0", "s50000"])).len(),
            2
        );
    }

    #[test]
    fn dependency_closure_puts_dependencies_first() {
        let g = graph(&["web:api,db", "api:db,cache", "db:", "worker:db", "cache:"]);
        let order = dependency_closure(&g, &names(&["web"]));
        assert_eq!(shown(&[order]), ["db cache api web"]);
        // Several roots, a repeated one, one that is only a target, and
        // one the graph does not know at all.
        let order = dependency_closure(&g, &names(&["worker", "api", "worker", "ghost"]));
        assert_eq!(shown(&[order]), ["db worker cache api ghost"]);
        // A cycle ends, each service once.
        let order = dependency_closure(&graph(&["a:b", "b:a"]), &names(&["a"]));
        assert_eq!(shown(&[order]), ["b a"]);
    }

    #[test]
    fn dependents_closure_puts_dependents_first_and_leaves_the_roots_out() {
        let g = graph(&["web:api,db", "api:db,cache", "db:", "worker:db", "cache:"]);
        let order = dependents_closure(&g, &names(&["db"]));
        assert_eq!(order.len(), 3);
        let at = |n: &str| order.iter().position(|x| x.as_str() == n).unwrap();
        assert!(at("web") < at("api"), "{order:?}");
        assert!(order.iter().any(|n| n.as_str() == "worker"));
        assert_eq!(
            shown(&[dependents_closure(&g, &names(&["cache"]))]),
            ["web api"]
        );
        assert!(dependents_closure(&g, &names(&["web", "ghost"])).is_empty());
        // Roots depending on each other: both left out.
        assert_eq!(
            shown(&[dependents_closure(&g, &names(&["api", "db"]))]),
            ["web worker"]
        );
        // Deterministic, whatever the roots' order.
        assert_eq!(
            dependents_closure(&g, &names(&["cache", "db"])),
            dependents_closure(&g, &names(&["db", "cache"]))
        );
    }

    #[test]
    fn stop_levels_put_dependents_first_and_independent_services_together() {
        let g = graph(&["web:api,db", "api:db,cache", "db:", "worker:db", "cache:"]);
        let all = names(&["cache", "db", "api", "web", "worker"]);
        assert_eq!(
            shown(&stop_order_levels(&g, &all)),
            ["web worker", "api", "cache db"]
        );
        // Through a service that is not stopping (api), web still goes
        // before db and cache.
        let levels = stop_order_levels(&g, &names(&["db", "web", "cache"]));
        assert_eq!(shown(&levels), ["web", "cache db"]);
        // Unknown names stop at once; a cycle stops together.
        let levels = stop_order_levels(
            &graph(&["a:b", "b:a", "c:a"]),
            &names(&["a", "b", "c", "z"]),
        );
        assert_eq!(shown(&levels), ["c z", "a b"]);
        assert!(stop_order_levels(&g, &[]).is_empty());
    }
}

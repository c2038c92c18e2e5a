//! The layout's invariant, checked on the sources: no import cycle among the modules of
//! `control-plane/src`, `agent/src`, `sim/src` or `chaos/src`. A module depends on another when it names it through
//! `crate::…`, `super::…` or `self::…` (in a path or a `use`, braces expanded), or names a child module
//! it declares (`mod x;` then `x::…`). Tests inside a file (`#[cfg(test)] mod tests { … }`)
//! and comments do not count.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Module = Vec<String>;

/// Every module of the crate rooted at `src`, by its path, with its file.
fn modules(src: &Path) -> BTreeMap<Module, PathBuf> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("read source dir") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path
                .strip_prefix(src)
                .expect("under src")
                .with_extension("");
            let mut parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if parts.last().is_some_and(|p| p == "main") {
                continue; // the binary is not a module of the library
            }
            if parts
                .last()
                .is_some_and(|p| p == "mod" || p == "lib" || p == "tests")
            {
                if parts.last().is_some_and(|p| p == "tests") {
                    continue; // a file of unit tests
                }
                parts.pop();
            }
            out.insert(parts, path);
        }
    }
    out
}

/// The source without comments and without a trailing `#[cfg(test)] mod tests { … }`.
fn code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).expect("read source");
    let text = match text.find("#[cfg(test)]\nmod tests {") {
        Some(at) => &text[..at],
        None => &text[..],
    };
    text.lines()
        .map(|line| match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The paths this source names from `crate` or `super`, each as its segments with the
/// starting point resolved against `module` (the module the file is).
fn named_paths(module: &Module, src: &str) -> Vec<Module> {
    let mut out = Vec::new();
    for start in ["crate::", "super::", "self::"] {
        let mut from = 0;
        while let Some(at) = src[from..].find(start) {
            let begin = from + at;
            from = begin + start.len();
            // Not the tail of another path, and not a visibility (`pub(in crate::x)`).
            if src[..begin].chars().next_back().is_some_and(is_ident)
                || src[..begin].ends_with("(in ")
            {
                continue;
            }
            let mut base: Module = match start {
                "crate::" => Vec::new(),
                "self::" => module.clone(),
                _ => module[..module.len().saturating_sub(1)].to_vec(),
            };
            let rest = &src[from..];
            let end = rest
                .find(|c: char| !(is_ident(c) || c == ':'))
                .unwrap_or(rest.len());
            let mut segments: Vec<&str> =
                rest[..end].split("::").filter(|s| !s.is_empty()).collect();
            while segments.first() == Some(&"super") {
                base.pop();
                segments.remove(0);
            }
            let mut path = base.clone();
            path.extend(segments.iter().map(|s| s.to_string()));
            out.push(path.clone());
            // `use a::{b, c::d}`: each item is a path too.
            if rest[end..].starts_with('{')
                && let Some(close) = rest[end..].find('}')
            {
                for item in rest[end + 1..end + close].split(',') {
                    let item = item.split(" as ").next().unwrap_or("").trim();
                    let mut p = path.clone();
                    p.extend(
                        item.split("::")
                            .map(|s| s.trim_matches(|c: char| !is_ident(c)))
                            .filter(|s| !s.is_empty() && *s != "self")
                            .map(str::to_string),
                    );
                    out.push(p);
                }
            }
        }
    }
    out
}

/// Child modules this file declares (`mod x;`, `pub mod x;`) and names (`x::`).
fn named_children(module: &Module, src: &str) -> Vec<Module> {
    let mut out = Vec::new();
    for line in src.lines() {
        let line = line.trim();
        let decl = line
            .strip_prefix("pub mod ")
            .or_else(|| line.strip_prefix("pub(crate) mod "))
            .or_else(|| line.strip_prefix("mod "));
        let Some(name) = decl.and_then(|d| d.strip_suffix(';')) else {
            continue;
        };
        let needle = format!("{name}::");
        let used = src.match_indices(&needle).any(|(at, _)| {
            !src[..at]
                .chars()
                .next_back()
                .is_some_and(|c| is_ident(c) || c == ':')
        });
        if used {
            let mut child = module.clone();
            child.push(name.to_string());
            out.push(child);
        }
    }
    out
}

/// The module graph: who depends on whom (the longest module prefix of each named path).
fn graph(src: &Path) -> BTreeMap<Module, BTreeSet<Module>> {
    let modules = modules(src);
    let resolve = |path: &Module| -> Option<Module> {
        (0..=path.len())
            .rev()
            .map(|n| path[..n].to_vec())
            .find(|p| modules.contains_key(p))
    };
    let mut edges = BTreeMap::new();
    for (module, file) in &modules {
        let src = code(file);
        let mut deps = BTreeSet::new();
        for path in named_paths(module, &src)
            .into_iter()
            .chain(named_children(module, &src))
        {
            if let Some(target) = resolve(&path)
                && &target != module
            {
                deps.insert(target);
            }
        }
        edges.insert(module.clone(), deps);
    }
    edges
}

/// One cycle of the graph, if there is any (depth-first search with colours).
fn a_cycle(graph: &BTreeMap<Module, BTreeSet<Module>>) -> Option<Vec<Module>> {
    fn visit(
        node: &Module,
        graph: &BTreeMap<Module, BTreeSet<Module>>,
        done: &mut BTreeSet<Module>,
        stack: &mut Vec<Module>,
    ) -> Option<Vec<Module>> {
        if let Some(at) = stack.iter().position(|m| m == node) {
            let mut cycle = stack[at..].to_vec();
            cycle.push(node.clone());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        stack.push(node.clone());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, done, stack) {
                return Some(cycle);
            }
        }
        stack.pop();
        done.insert(node.clone());
        None
    }
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        if let Some(cycle) = visit(node, graph, &mut done, &mut Vec::new()) {
            return Some(cycle);
        }
    }
    None
}

fn show(cycle: &[Module]) -> String {
    cycle
        .iter()
        .map(|m| {
            if m.is_empty() {
                "<root>".to_string()
            } else {
                m.join("::")
            }
        })
        .collect::<Vec<_>>()
        .join(" -> ")
}

/// `at_least`: fewer modules found means the reader lost its way, not that the crate shrank.
fn assert_acyclic(crate_dir: &str, at_least: usize) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(crate_dir)
        .join("src");
    let graph = graph(&src);
    assert!(
        graph.len() >= at_least,
        "{crate_dir}: only {} modules found",
        graph.len()
    );
    if let Some(cycle) = a_cycle(&graph) {
        panic!("{crate_dir}/src has an import cycle: {}", show(&cycle));
    }
}

#[test]
fn the_control_plane_has_no_import_cycle() {
    assert_acyclic("control-plane", 40);
}

#[test]
fn the_simulator_has_no_import_cycle() {
    assert_acyclic("sim", 10);
}

#[test]
fn the_checker_finds_a_cycle_when_there_is_one() {
    let dir = tempfile::tempdir().expect("temp dir");
    let src = dir.path();
    std::fs::write(src.join("lib.rs"), "pub mod a;\npub mod b;\n").expect("write");
    std::fs::write(
        src.join("a.rs"),
        "use crate::b::{B, other};\npub struct A;\n",
    )
    .expect("write");
    std::fs::write(src.join("b.rs"), "pub struct B(pub super::a::A);\n").expect("write");
    let cycle = a_cycle(&graph(src)).expect("a <-> b");
    assert_eq!(cycle.len(), 3, "{}", show(&cycle));
    std::fs::write(
        src.join("b.rs"),
        "pub struct B; // super::a would close it\n",
    )
    .expect("write");
    assert!(a_cycle(&graph(src)).is_none());
}

#[test]
fn the_agent_has_no_import_cycle() {
    assert_acyclic("agent", 40);
}

#[test]
fn the_chaos_suite_has_no_import_cycle() {
    assert_acyclic("chaos", 9);
}

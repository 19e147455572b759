//! The modules of `actors/src` form no cycle: messages and records are plain data at the
//! bottom, the actors import those and never each other, and start-up sits above them.
//! Read from the `use crate::…` lines and `crate::…` paths of the sources themselves.

use std::collections::{BTreeMap, BTreeSet};

fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut modules = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        if name != "lib" && path.extension().is_some_and(|e| e == "rs") {
            // Code only: a doc link to another module is not an import.
            let code: Vec<String> = std::fs::read_to_string(&path)
                .unwrap()
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .map(str::to_owned)
                .collect();
            modules.insert(name, code.join("\n"));
        }
    }
    let names: BTreeSet<String> = modules.keys().cloned().collect();
    modules
        .iter()
        .map(|(m, text)| {
            // Every `crate::x` path, in `use` lines and in code alike (`use crate::{a, b}`
            // is not used here; the test fails loudly below if it ever is).
            assert!(
                !text.contains("use crate::{"),
                "{m}: write one `use crate::x` per module"
            );
            let uses = text
                .match_indices("crate::")
                .filter_map(|(i, _)| {
                    let rest = &text[i + "crate::".len()..];
                    let end = rest.find(|c: char| !(c.is_alphanumeric() || c == '_'))?;
                    Some(rest[..end].to_owned())
                })
                .filter(|d| names.contains(d) && d != m)
                .collect();
            (m.clone(), uses)
        })
        .collect()
}

/// A cycle in `graph`, if it has one, as the modules along it.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        m: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if done.contains(m) {
            return None;
        }
        if let Some(i) = path.iter().position(|p| p == m) {
            let mut cycle = path[i..].to_vec();
            cycle.push(m.to_owned());
            return Some(cycle);
        }
        path.push(m.to_owned());
        for d in &graph[m] {
            if let Some(c) = visit(d, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(m.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|m| visit(m, graph, &mut Vec::new(), &mut done))
}

#[test]
fn no_two_modules_of_actors_import_each_other() {
    let graph = imports();
    assert!(graph.len() >= 15, "read the sources: {:?}", graph.keys());
    if let Some(c) = find_cycle(&graph) {
        panic!("import cycle: {}", c.join(" -> "));
    }
    // The leaves stay leaves, and no actor knows another.
    for leaf in ["messages", "records", "views", "error", "clock"] {
        for actor in [
            "driver",
            "rider",
            "trip",
            "cell",
            "supervisor",
            "context",
            "system",
        ] {
            assert!(
                !graph[leaf].contains(actor),
                "{leaf} imports {actor}: {:?}",
                graph[leaf]
            );
        }
    }
    for a in ["driver", "rider", "trip", "cell"] {
        for b in ["driver", "rider", "trip", "cell", "supervisor", "system"] {
            assert!(a == b || !graph[a].contains(b), "{a} imports {b}");
        }
    }
}

#[test]
fn the_check_finds_a_cycle_when_there_is_one() {
    let mut graph = imports();
    assert_eq!(find_cycle(&graph), None);
    // Today's graph with one more import, of the facade by the messages: a cycle.
    graph.get_mut("messages").unwrap().insert("system".into());
    let c = find_cycle(&graph).expect("a cycle");
    assert!(
        c.contains(&"messages".to_owned()) && c.contains(&"system".to_owned()),
        "{c:?}"
    );
}

//! The layering of the workspace: `sd-models` (candle only) <- `sd-engine` (no HTTP, no CLI,
//! no async runtime) <- `sd-worker` (CLI and HTTP). Cargo already forbids cycles between
//! crates; these tests check what Cargo does not: which third-party crates each layer pulls
//! in, and that no two modules of a crate import each other (directly or round a loop).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `cargo tree` of one package: its normal (not dev) dependencies with their features.
fn tree(package: &str) -> String {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(workspace())
        .args([
            "tree",
            "--offline",
            "-p",
            package,
            "-e",
            "normal,features",
            "--prefix",
            "none",
        ])
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree -p {package}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The crate names in a `cargo tree` listing.
fn crates(tree: &str) -> BTreeSet<String> {
    tree.lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

#[test]
fn lower_layers_pull_in_no_http_cli_or_runtime() {
    let http_cli = ["axum", "hyper", "tower", "clap", "indicatif"];
    let models = tree("sd-models");
    let engine = tree("sd-engine");
    for (layer, listing, forbidden) in [
        (
            "sd-models",
            &models,
            &[&http_cli[..], &["tokio", "metrics", "ureq"]].concat(),
        ),
        (
            "sd-engine",
            &engine,
            &[&http_cli[..], &["metrics-exporter-prometheus"]].concat(),
        ),
    ] {
        let found = crates(listing);
        for f in forbidden {
            assert!(!found.contains(*f), "{layer} depends on {f}");
        }
    }
    // The engine uses tokio's channels only: no runtime, no sockets.
    for feature in ["rt", "rt-multi-thread", "net", "signal"] {
        let needle = format!("tokio feature \"{feature}\"");
        assert!(!engine.contains(&needle), "sd-engine enables {needle}");
    }
    assert!(crates(&engine).contains("sd-models"));
}

/// A module of a crate by its path (`jobs::runner`); the crate root is the empty path.
type Module = Vec<String>;

/// Every module file of a crate's `src`: `lib.rs` / `main.rs` is the root, `a.rs` and
/// `a/mod.rs` are `a`, `a/b.rs` is `a::b`.
fn module_files(src: &Path) -> BTreeMap<Module, PathBuf> {
    let mut out = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().and_then(|e| e.to_str()) != Some("rs") {
                continue;
            }
            let rel = path.strip_prefix(src).unwrap();
            let mut parts: Vec<String> = rel
                .iter()
                .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
                .collect();
            if matches!(
                parts.last().map(String::as_str),
                Some("mod" | "lib" | "main")
            ) {
                parts.pop();
            }
            out.insert(parts, path);
        }
    }
    out
}

/// The paths a source text names after `crate::` or `super::` (with one level of braces
/// expanded), as segments relative to the crate root. Comments and inline
/// `#[cfg(test)] mod tests` blocks at the end of a file are left out (a test block's `super` is
/// the file itself).
fn referenced_paths(text: &str, module: &Module) -> Vec<Module> {
    let text = match text.find("#[cfg(test)]\nmod tests {") {
        Some(i) => &text[..i],
        None => text,
    };
    // Comments (doc links included) import nothing.
    let text: String = text
        .lines()
        .map(|l| l.split_once("//").map_or(l, |(code, _)| code))
        .collect::<Vec<_>>()
        .join("\n");
    let text = text.as_str();
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut i = 0;
    while i < bytes.len() {
        if !text.is_char_boundary(i) || i > 0 && (ident(bytes[i - 1]) || bytes[i - 1] == b':') {
            i += 1;
            continue;
        }
        let rest = &text[i..];
        let (mut base, mut j) = if rest.starts_with("crate::") {
            (Vec::new(), i + "crate::".len())
        } else if rest.starts_with("super::") {
            let mut base = module.clone();
            base.pop();
            (base, i + "super::".len())
        } else {
            i += 1;
            continue;
        };
        while text[j..].starts_with("super::") {
            base.pop();
            j += "super::".len();
        }
        let tail = if text[j..].starts_with('{') {
            let end = text[j..].find('}').map_or(text.len(), |e| j + e);
            text[j + 1..end].to_string()
        } else {
            let end = text[j..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                .map_or(text.len(), |e| j + e);
            text[j..end].to_string()
        };
        for item in tail.split(',') {
            let segments: Vec<String> = item
                .trim()
                .split("::")
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty() && s.chars().all(|c| c.is_alphanumeric() || c == '_'))
                .collect();
            let mut path = base.clone();
            path.extend(segments);
            out.push(path);
        }
        i = j;
    }
    out
}

/// Module import edges of one crate between sibling subtrees: when `a::x` names something of
/// `b::y`, `a -> b` (a module and its submodules are one unit seen from outside; a module
/// naming its parent or its children stays inside its unit).
fn import_graph(src: &Path) -> BTreeMap<Module, BTreeSet<Module>> {
    let files = module_files(src);
    let mut graph: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    for (module, path) in &files {
        let text = std::fs::read_to_string(path).unwrap();
        graph.entry(module.clone()).or_default();
        for mut target in referenced_paths(&text, module) {
            // The longest prefix that is a module file.
            while !target.is_empty() && !files.contains_key(&target) {
                target.pop();
            }
            if module.starts_with(&target) || target.starts_with(module) {
                continue;
            }
            let common = module
                .iter()
                .zip(&target)
                .take_while(|(a, b)| a == b)
                .count();
            graph
                .entry(module[..=common].to_vec())
                .or_default()
                .insert(target[..=common].to_vec());
        }
    }
    graph
}

/// A cycle of the graph, if it has one.
fn find_cycle(graph: &BTreeMap<Module, BTreeSet<Module>>) -> Option<Vec<Module>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit(
        node: &Module,
        graph: &BTreeMap<Module, BTreeSet<Module>>,
        marks: &mut BTreeMap<Module, Mark>,
        stack: &mut Vec<Module>,
    ) -> Option<Vec<Module>> {
        match marks.get(node) {
            Some(Mark::Done) => return None,
            Some(Mark::Open) => {
                let start = stack.iter().position(|m| m == node).unwrap_or(0);
                let mut cycle = stack[start..].to_vec();
                cycle.push(node.clone());
                return Some(cycle);
            }
            None => {}
        }
        marks.insert(node.clone(), Mark::Open);
        stack.push(node.clone());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, graph, marks, stack) {
                return Some(c);
            }
        }
        stack.pop();
        marks.insert(node.clone(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    graph
        .keys()
        .find_map(|n| visit(n, graph, &mut marks, &mut Vec::new()))
}

#[test]
fn no_crate_has_an_import_cycle() {
    for krate in ["models", "engine", "server"] {
        let src = workspace().join("crates").join(krate).join("src");
        let graph = import_graph(&src);
        assert!(
            graph.len() > 5,
            "{krate}: only {} modules found",
            graph.len()
        );
        if let Some(cycle) = find_cycle(&graph) {
            let names: Vec<String> = cycle
                .iter()
                .map(|m| format!("crate::{}", m.join("::")))
                .collect();
            panic!("{krate}: import cycle {}", names.join(" -> "));
        }
    }
}

/// The checker finds what it must: a loop through `use crate::{...}` that enters a module by
/// one of its children, and a loop through `super::super::`, while a child naming its parent
/// is no loop.
#[test]
fn the_cycle_check_can_fail() {
    let dir = std::env::temp_dir().join(format!("sd-layering-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("a")).unwrap();
    let write = |p: &str, s: &str| std::fs::write(dir.join(p), s).unwrap();
    write("lib.rs", "mod a;\nmod b;\n");
    write("a/mod.rs", "mod c;\nuse crate::{b::X, a::c::Y};\n");
    write("a/c.rs", "use super::Z;\n");
    write("b.rs", "fn f() { let _ = crate::d::W; }\n");
    write("d.rs", "");
    let graph = import_graph(&dir);
    assert_eq!(find_cycle(&graph), None, "{graph:?}");
    write("d.rs", "use crate::a::c::Y;\n");
    let graph = import_graph(&dir);
    let cycle = find_cycle(&graph).expect("a -> b -> d -> a (by a::c) is a cycle");
    assert!(cycle.len() >= 3, "{cycle:?}");
    write("d.rs", "");
    write("a/c.rs", "use super::super::b::X;\n");
    write("b.rs", "use crate::a::c::Q;\n");
    let graph = import_graph(&dir);
    assert!(find_cycle(&graph).is_some(), "{graph:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

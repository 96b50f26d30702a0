//! The source's shape, checked: no dependency cycle between top-level modules (read from
//! `crate::x` and `super::` paths in non-test code), no file over 600 lines in any crate's
//! sources or tests, and the executor short. Reads the crate's own `src/` through
//! `CARGO_MANIFEST_DIR`, so it keeps working wherever the crate lives in a workspace.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

const MAX_FILE_LINES: usize = 600;
const MAX_EXECUTOR_LINES: usize = 300;

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `dir`, as (path relative to `root`, contents).
fn sources(root: &Path, dir: &Path, out: &mut Vec<(String, String)>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            sources(root, &path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let relative = path.strip_prefix(root).unwrap();
            let name = relative.to_string_lossy().replace('\\', "/");
            out.push((name, std::fs::read_to_string(&path).unwrap()));
        }
    }
}

/// The module path of a file: `foo/bar.rs` → `[foo, bar]`, `foo/mod.rs` → `[foo]`.
fn module_path(file: &str) -> Vec<String> {
    let mut parts: Vec<String> = file
        .trim_end_matches(".rs")
        .split('/')
        .map(str::to_owned)
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts
}

/// The code of a file, without comments (doc links are not dependencies) and without its
/// tests (a test may use anything).
fn code(text: &str) -> String {
    let text = text
        .split("#[cfg(test)]\nmod tests {")
        .next()
        .unwrap_or_default();
    let lines = text.lines().filter(|l| !l.trim_start().starts_with("//"));
    lines.collect::<Vec<_>>().join("\n")
}

fn ident(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// The first segment of each path a `{…}` group at the start of `s` names.
fn group(s: &str) -> Vec<&str> {
    let (mut depth, mut names, mut start) = (0, Vec::new(), 1);
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' | ',' if depth == 1 => {
                names.push(ident(s[start..].trim_start()));
                start = i + 1;
                if c == '}' {
                    break;
                }
            }
            '}' => depth -= 1,
            _ => {}
        }
    }
    names
}

/// The top-level modules `text` (in the module at `path`) refers to.
fn references(path: &[String], text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let code = code(text);
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        match rest.starts_with('{') {
            true => out.extend(group(rest).into_iter().map(str::to_owned)),
            false => {
                out.insert(ident(rest).to_owned());
            }
        }
    }
    // `super::super::x` from `[a, b]` is `crate::x`.
    for (i, _) in code.match_indices("super::") {
        if code[..i].ends_with("super::") {
            continue;
        }
        let mut rest = &code[i..];
        let mut up = 0;
        while let Some(r) = rest.strip_prefix("super::") {
            rest = r;
            up += 1;
        }
        if up == path.len() {
            out.insert(ident(rest).to_owned());
        }
    }
    out
}

/// Top-level module → the top-level modules it uses.
fn graph(files: &[(String, String)]) -> BTreeMap<String, BTreeSet<String>> {
    let top: BTreeSet<String> = files
        .iter()
        .map(|(f, _)| module_path(f)[0].clone())
        .collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (file, text) in files {
        let path = module_path(file);
        if ["lib", "main"].contains(&path[0].as_str()) || path.iter().any(|p| p == "tests") {
            continue;
        }
        let uses = references(&path, text)
            .into_iter()
            .filter(|m| top.contains(m) && *m != path[0]);
        graph.entry(path[0].clone()).or_default().extend(uses);
    }
    graph
}

/// The strongly connected groups of more than one module (Tarjan), each sorted.
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct Walk<'a> {
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        found: Vec<Vec<String>>,
    }
    impl<'a> Walk<'a> {
        fn visit(&mut self, v: &'a str) {
            let n = self.index.len();
            self.index.insert(v, n);
            self.low.insert(v, n);
            self.stack.push(v);
            for w in self.graph.get(v).into_iter().flatten() {
                if !self.index.contains_key(w.as_str()) {
                    self.visit(w);
                    let low = self.low[v].min(self.low[w.as_str()]);
                    self.low.insert(v, low);
                } else if self.stack.contains(&w.as_str()) {
                    let low = self.low[v].min(self.index[w.as_str()]);
                    self.low.insert(v, low);
                }
            }
            if self.low[v] == self.index[v] {
                let at = self.stack.iter().rposition(|&x| x == v).unwrap();
                let mut group: Vec<String> = self.stack.drain(at..).map(str::to_owned).collect();
                group.sort();
                if group.len() > 1 {
                    self.found.push(group);
                }
            }
        }
    }
    let mut walk = Walk {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        found: Vec::new(),
    };
    for v in graph.keys() {
        if !walk.index.contains_key(v.as_str()) {
            walk.visit(v);
        }
    }
    walk.found
}

fn all_sources() -> Vec<(String, String)> {
    let mut files = Vec::new();
    sources(&src(), &src(), &mut files);
    files
}

#[test]
fn no_cycle_between_top_level_modules() {
    let graph = graph(&all_sources());
    let found = cycles(&graph);
    let found: Vec<_> = found.iter().collect();
    assert!(
        found.is_empty(),
        "module cycles: {}",
        describe(&graph, &found)
    );
}

/// Each cycle's modules, and the uses between them that make it one.
fn describe(graph: &BTreeMap<String, BTreeSet<String>>, cycles: &[&Vec<String>]) -> String {
    let named: Vec<String> = cycles
        .iter()
        .map(|c| {
            let within = |a: &String| {
                let uses = graph.get(a).into_iter().flatten().filter(|b| c.contains(b));
                uses.map(move |b| format!("{a} → {b}")).collect::<Vec<_>>()
            };
            let edges: Vec<String> = c.iter().flat_map(within).collect();
            format!("{} ({})", c.join(" ↔ "), edges.join(", "))
        })
        .collect();
    named.join("; ")
}

/// Where the line limit holds: the worker's `src/` and `tests/`, and each of the workspace's
/// other crates' `src/` and, if it has one, `tests/`.
fn limited_dirs(root: &Path) -> Vec<PathBuf> {
    let mut dirs = vec![root.join("src"), root.join("tests")];
    let mut crates: Vec<PathBuf> = std::fs::read_dir(root.join("crates"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    crates.sort();
    for krate in crates {
        dirs.push(krate.join("src"));
        if krate.join("tests").is_dir() {
            dirs.push(krate.join("tests"));
        }
    }
    dirs
}

#[test]
fn no_source_file_is_over_600_lines() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for dir in limited_dirs(root) {
        let before = files.len();
        sources(root, &dir, &mut files);
        assert!(files.len() > before, "no .rs file under {}", dir.display());
    }
    let long: Vec<String> = files
        .into_iter()
        .filter(|(_, text)| text.lines().count() > MAX_FILE_LINES)
        .map(|(file, text)| format!("{file} ({} lines)", text.lines().count()))
        .collect();
    assert!(
        long.is_empty(),
        "over {MAX_FILE_LINES} lines: {}",
        long.join(", ")
    );
}

#[test]
fn the_executor_is_short() {
    let executor: Vec<(String, String)> = all_sources()
        .into_iter()
        .filter(|(f, _)| ["executor", "pipeline"].contains(&module_path(f)[0].as_str()))
        .collect();
    let lines: usize = executor.iter().map(|(_, t)| t.lines().count()).sum();
    let files: Vec<&str> = executor.iter().map(|(f, _)| f.as_str()).collect();
    assert!(
        !files.is_empty(),
        "no executor found under {}",
        src().display()
    );
    assert!(
        lines <= MAX_EXECUTOR_LINES,
        "the executor ({}) has {lines} lines, over {MAX_EXECUTOR_LINES}",
        files.join(", ")
    );
}

/// The reader itself: grouped imports, nested groups, `super::` out of a nested file.
#[test]
fn references_are_read_from_paths() {
    let path = module_path("job/listing.rs");
    let text = "use crate::{a::{B, C}, d, e::f};\nuse super::super::g::H;\n// crate::comment\nfn x() { crate::i::j(); }";
    let found: Vec<String> = references(&path, text).into_iter().collect();
    assert_eq!(found, ["a", "d", "e", "g", "i"]);
    let inner: Vec<String> = references(&path, "use super::outcome;")
        .into_iter()
        .collect();
    assert!(
        inner.is_empty(),
        "super:: within the module is no dependency: {inner:?}"
    );
}

//! The repository stands alone: every relative link in its Markdown resolves to a file inside the
//! repository and, with a `#fragment`, to a heading of that file. A clone has nothing else.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .canonicalize()
        .expect("the repository")
}

/// Every `.md` file of the repository, outside build output and version control.
fn markdown_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy();
        if path.is_dir() {
            if !matches!(name.as_ref(), "target" | ".git") {
                markdown_files(&path, out);
            }
        } else if name.ends_with(".md") {
            out.push(path);
        }
    }
}

/// Lines outside fenced code blocks.
fn prose(text: &str) -> Vec<&str> {
    let mut fenced = false;
    text.lines()
        .filter(|line| {
            if line.starts_with("```") {
                fenced = !fenced;
                return false;
            }
            !fenced
        })
        .collect()
}

/// GitHub's anchor for a Markdown heading.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == '-' || *c == '_' || *c == ' ')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The anchors of `markdown`'s headings (outside code blocks); the alert runbook's are checked
/// with it too.
pub fn anchors(markdown: &Path) -> BTreeSet<String> {
    let text = std::fs::read_to_string(markdown).unwrap();
    prose(&text)
        .into_iter()
        .filter_map(|line| line.strip_prefix('#'))
        .map(|heading| slug(heading.trim_start_matches('#')))
        .collect()
}

/// The targets of inline links `[text](target)` on a line.
fn link_targets(line: &str) -> Vec<&str> {
    line.match_indices("](")
        .filter_map(|(at, _)| {
            let rest = &line[at + 2..];
            rest.find(')').map(|end| rest[..end].trim())
        })
        .collect()
}

#[test]
fn every_relative_link_resolves_inside_the_repository() {
    let root = root();
    let mut files = Vec::new();
    markdown_files(&root, &mut files);
    assert!(files.len() >= 8, "found {files:?}");
    let mut broken = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let shown = file.strip_prefix(&root).unwrap().display().to_string();
        for line in prose(&text) {
            for target in link_targets(line) {
                if target.contains("://") || target.starts_with("mailto:") {
                    continue;
                }
                let (path, fragment) = target.split_once('#').unwrap_or((target, ""));
                let resolved = if path.is_empty() {
                    file.clone()
                } else {
                    match file.parent().unwrap().join(path).canonicalize() {
                        Ok(p) => p,
                        Err(_) => {
                            broken.push(format!("{shown}: {target} does not exist"));
                            continue;
                        }
                    }
                };
                if !resolved.starts_with(&root) {
                    broken.push(format!("{shown}: {target} leaves the repository"));
                } else if !fragment.is_empty()
                    && resolved.extension().is_some_and(|e| e == "md")
                    && !anchors(&resolved).contains(fragment)
                {
                    broken.push(format!("{shown}: {target} names no heading"));
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

/// The quick start keeps its promise: the two commands first, and the documents it points to.
#[test]
fn the_readme_starts_with_the_two_commands_and_links_the_reference_docs() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let commands: Vec<&str> = readme
        .lines()
        .filter(|l| l.starts_with("scripts/"))
        .take(2)
        .collect();
    assert_eq!(
        commands.len(),
        2,
        "the README shows scripts/demo.sh and scripts/test.sh"
    );
    assert!(commands[0].starts_with("scripts/demo.sh"), "{commands:?}");
    assert!(commands[1].starts_with("scripts/test.sh"), "{commands:?}");
    let first_lines: String = readme.lines().take(6).collect::<Vec<_>>().join("\n");
    assert!(first_lines.contains("scripts/demo.sh"), "{first_lines}");
    for doc in [
        "docs/contract.md",
        "docs/configuration.md",
        "docs/operations.md",
        "docs/architecture.md",
        "docs/schemas/request.schema.json",
        "docs/schemas/event.schema.json",
        "LICENSE",
        "CHANGELOG.md",
    ] {
        assert!(readme.contains(&format!("]({doc}")), "README links {doc}");
    }
}

/// The configuration reference names every key the built-in defaults set.
#[test]
fn every_default_key_is_in_the_configuration_reference() {
    use figment::{
        Figment,
        providers::{Format, Toml},
    };
    let defaults: serde_json::Map<String, serde_json::Value> =
        Figment::from(Toml::file_exact(root().join("config/default.toml")))
            .extract()
            .expect("config/default.toml parses");
    let reference = std::fs::read_to_string(root().join("docs/configuration.md")).unwrap();
    let mut missing = Vec::new();
    for (section, keys) in &defaults {
        let in_heading = reference.contains(&format!("`[{section}]`"));
        for key in keys.as_object().expect("a [section] table").keys() {
            let named = reference.contains(&format!("`{key}`"))
                || reference.contains(&format!("`{section}.{key}`"));
            if !(in_heading && named) {
                missing.push(format!("{section}.{key}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "docs/configuration.md does not document {missing:?}"
    );
}

//! The layers of `src/`, kept by a check: a module may use only modules
//! of the layers below its own (and its own module's files). A shared piece
//! living with one of its users, or a cycle, fails here, naming the file
//! and the import. The order is the one `src/lib.rs` draws.

use outbox_testkit::repo_root;
use std::collections::BTreeSet;
use std::path::Path;

/// Top-level modules, lowest layer first. Modules of one layer do not use
/// each other.
const LAYERS: &[&[&str]] = &[
    &["backoff", "event", "pgtime", "metrics", "shutdown"],
    &["tls"],
    &["config"],
    &["db"],
    &["replication", "publish"],
    &["outbox"],
    &["error"],
    &["stats", "http", "supervise", "pipeline", "republish"],
    &["app"],
    &["lib", "main"],
];

fn layer(module: &str) -> usize {
    LAYERS
        .iter()
        .position(|layer| layer.contains(&module))
        .unwrap_or_else(|| panic!("module {module} has no layer in tests/it/layering.rs"))
}

/// `src/a/b.rs` → `a`; `src/lib.rs` → `lib`.
fn top_module(file: &Path) -> String {
    let relative = file.strip_prefix(repo_root().join("src")).unwrap();
    let first = relative.components().next().unwrap().as_os_str();
    first.to_string_lossy().trim_end_matches(".rs").to_owned()
}

/// The top-level modules a file names as `crate::<module>`, outside
/// comments and tests (`#[cfg(test)]` onwards, where any module may be
/// used to set a case up).
fn uses(text: &str) -> BTreeSet<String> {
    let code = text.split("#[cfg(test)]").next().unwrap_or_default();
    // Comments out, then one line: a `use crate::{` group may span several.
    let code: String = code
        .lines()
        .map(|line| line.split("//").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join(" ");
    let mut used = BTreeSet::new();
    {
        let mut rest = code.as_str();
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            let names: Vec<&str> = match rest.strip_prefix('{') {
                // `crate::{a, b::c}`: the first segment of each.
                Some(group) => group
                    .split('}')
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .map(|item| item.trim().split("::").next().unwrap_or_default())
                    .collect(),
                None => vec![rest
                    .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                    .next()
                    .unwrap_or_default()],
            };
            used.extend(
                names
                    .into_iter()
                    .filter(|n| {
                        !n.is_empty() && n.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                    })
                    .map(str::to_owned),
            );
        }
    }
    used
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every `use` of another module goes down a layer.
fn violations() -> Vec<String> {
    let mut files = Vec::new();
    rust_files(&repo_root().join("src"), &mut files);
    files.sort();
    let mut found = Vec::new();
    for file in files {
        let module = top_module(&file);
        if module == "lib" || module == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        for used in uses(&text) {
            if used != module && layer(&used) >= layer(&module) {
                found.push(format!(
                    "{}: {module} (layer {}) uses {used} (layer {})",
                    file.strip_prefix(repo_root()).unwrap().display(),
                    layer(&module),
                    layer(&used)
                ));
            }
        }
    }
    found
}

#[test]
fn no_module_uses_one_above_it() {
    let found = violations();
    assert!(
        found.is_empty(),
        "imports that run up the layers:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_check_reads_imports_as_written() {
    let text = "use crate::error::Error;\nuse crate::{db,\n    http::serve};\n\
                // crate::app in a comment\nfn f() { crate::pgtime::now_micros(); }\n\
                #[cfg(test)]\nmod tests { use crate::app; }\n";
    let found: Vec<String> = uses(text).into_iter().collect();
    assert_eq!(found, ["db", "error", "http", "pgtime"]);
    // And it would catch what it exists for: the sweeper using the pipeline.
    assert!(layer("pipeline") > layer("outbox"));
}

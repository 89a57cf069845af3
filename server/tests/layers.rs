//! The server's modules form three layers that depend one way: the engine
//! (one volume's durable storage) imports nothing above it, replication
//! imports the engine, and the control plane imports both; nothing below the
//! control plane imports it, and no two top-level modules import each other
//! in a cycle. Read off the sources: a `crate::MODULE` path outside comments
//! and test modules is a dependency.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Every top-level module of `server/src` and its layer (0 engine,
/// 1 replication, 2 control). A new module must be placed here.
const LAYERS: &[(&str, u8)] = &[
    ("admission", 0),
    ("buffer", 0),
    ("busy_poll", 0),
    ("core_runtime", 0),
    ("engine", 0),
    ("events", 0),
    ("journal", 0),
    ("lsn_gate", 0),
    ("overlay", 0),
    ("sockio", 0),
    ("store", 0),
    ("telemetry", 0),
    ("tls", 0),
    ("units", 0),
    ("export", 1),
    ("lease_fence", 1),
    ("replication", 1),
    ("volume", 1),
    ("admin", 2),
    ("config", 2),
    ("control", 2),
    ("coordinator", 2),
    ("handover", 2),
    ("cores", 2),
    ("lifecycle", 2),
    ("listener", 2),
    ("node", 2),
    ("restart", 2),
    ("notify", 2),
    ("status", 2),
];

/// The top-level module a source file belongs to (None for lib.rs, main.rs).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.trim_end_matches(".rs");
    (name != "lib" && name != "main").then(|| name.to_string())
}

/// The `crate::X` modules a file's production code names.
fn dependencies(text: &str) -> BTreeSet<String> {
    let code = text.split("#[cfg(test)]").next().unwrap_or("");
    let mut out = BTreeSet::new();
    for line in code.lines().filter(|l| !l.trim_start().starts_with("//")) {
        let mut rest = line;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            out.insert(name);
        }
    }
    out
}

/// A file that is a test module as a whole (`tests.rs`, `*_tests.rs`,
/// declared under `#[cfg(test)]` by its parent): none of it is production code.
fn is_test_module(path: &Path) -> bool {
    path.file_stem()
        .and_then(|s| s.to_str())
        .is_some_and(|s| s == "tests" || s.ends_with("_tests"))
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read the source directory") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") && !is_test_module(&path) {
            out.push(path);
        }
    }
}

/// The module graph of `server/src`: module → the modules it names.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let Some(m) = module_of(&src, &f) else {
            continue;
        };
        let text = std::fs::read_to_string(&f).expect("read a source file");
        let deps = g.entry(m.clone()).or_default();
        deps.extend(dependencies(&text).into_iter().filter(|d| *d != m));
    }
    g
}

fn layer(m: &str) -> u8 {
    LAYERS
        .iter()
        .find(|(n, _)| *n == m)
        .map(|(_, l)| *l)
        .unwrap_or_else(|| panic!("module '{m}' has no layer: add it to LAYERS"))
}

#[test]
fn no_module_imports_a_layer_above_its_own() {
    let mut wrong = Vec::new();
    for (m, deps) in graph() {
        for d in deps {
            if layer(&d) > layer(&m) {
                wrong.push(format!(
                    "{m} (layer {}) -> {d} (layer {})",
                    layer(&m),
                    layer(&d)
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "upward dependencies:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn no_two_modules_depend_on_each_other() {
    let g = graph();
    let reaches = |from: &str, to: &str| {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from.to_string()];
        while let Some(m) = stack.pop() {
            for d in g.get(&m).into_iter().flatten() {
                if d == to {
                    return true;
                }
                if seen.insert(d.clone()) {
                    stack.push(d.clone());
                }
            }
        }
        false
    };
    let cycles: Vec<String> = g
        .iter()
        .flat_map(|(m, deps)| deps.iter().map(move |d| (m, d)))
        .filter(|(m, d)| reaches(d, m))
        .map(|(m, d)| format!("{m} -> {d}"))
        .collect();
    assert!(
        cycles.is_empty(),
        "import cycles through:\n{}",
        cycles.join("\n")
    );
}

#[test]
fn the_reader_finds_paths_but_not_comments_or_tests() {
    let text = "use crate::engine::Engine;\n// crate::node\nfn f() { crate::units::BLOCK; }\n#[cfg(test)]\nuse crate::cores;";
    let deps: Vec<String> = dependencies(text).into_iter().collect();
    assert_eq!(deps, ["engine", "units"]);
}

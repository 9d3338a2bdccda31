//! The map kept true: the layers are read from ARCHITECTURE.md's "Layers" table, the
//! imports from `src/`, and every `crate::` path must point to a lower layer (a
//! module may always use its own submodules). Inside a module, its files must not
//! use each other in a circle (names re-exported by the module's `mod.rs` are
//! followed to the file that defines them).
//!
//! The checker is plain text over the sources: comments and `#[cfg(test)]` modules
//! are left out (a test may reach anywhere). Its own tests run it on small made-up
//! trees with an upward import and a circle, so it cannot pass by finding nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layer of every top-level module: 0 is the highest (uses everything).
fn layers(architecture: &str) -> BTreeMap<String, usize> {
    let section = architecture
        .split("\n## Layers")
        .nth(1)
        .expect("ARCHITECTURE.md has a \"## Layers\" section");
    let section = section.split("\n## ").next().unwrap_or(section);
    let mut out = BTreeMap::new();
    let mut n = 0;
    for line in section.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // | layer | modules | ... |: a data row has a number in its first cell.
        if cells.len() < 4 || cells[1].parse::<usize>().is_err() {
            continue;
        }
        for module in cells[2].split('`').skip(1).step_by(2) {
            let prior = out.insert(module.to_string(), n);
            assert!(prior.is_none(), "{module} is in two layers");
        }
        n += 1;
    }
    assert!(n >= 3, "the Layers table has at least three rows: {out:?}");
    out
}

/// One source file: its module path under `src/` (`predict/request`), its text with
/// comments and test modules removed.
struct Source {
    path: Vec<String>,
    code: String,
}

fn strip(text: &str) -> String {
    let text = text.split("#[cfg(test)]").next().unwrap_or(text);
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        // A line comment ends the line; `//` inside a string literal would cut it
        // short, which can only hide a path, never invent one.
        let code = line.find("//").map_or(line, |at| &line[..at]);
        out.push_str(code);
        out.push('\n');
    }
    out
}

fn sources(root: &Path) -> Vec<Source> {
    fn walk(dir: &Path, prefix: &[String], out: &mut Vec<Source>) {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for p in entries {
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            if p.is_dir() {
                let mut next = prefix.to_vec();
                next.push(name);
                walk(&p, &next, out);
            } else if let Some(stem) = name.strip_suffix(".rs") {
                let mut path = prefix.to_vec();
                if stem != "mod" {
                    path.push(stem.to_string());
                }
                out.push(Source {
                    path,
                    code: strip(&std::fs::read_to_string(&p).unwrap()),
                });
            }
        }
    }
    let mut out = Vec::new();
    walk(root, &[], &mut out);
    out
}

/// Every `crate::a::b…` path in `code`, as its segments (grouped `use crate::{…}`
/// imports expanded one level: `crate::{a::x, b}` → `[a, x]`, `[b]`).
fn crate_paths(code: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let before = rest[..at].chars().last();
        rest = &rest[at + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
            continue; // `$crate::` in a macro, or a longer identifier
        }
        if let Some(group) = rest.strip_prefix('{') {
            let end = matching_brace(group);
            for item in split_top(&group[..end]) {
                out.push(segments(item));
            }
        } else {
            out.push(segments(rest));
        }
    }
    out.retain(|p| !p.is_empty());
    out
}

/// The index of the `}` closing a group that starts just after its `{`.
fn matching_brace(s: &str) -> usize {
    let mut depth = 0;
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => return i,
            '}' => depth -= 1,
            _ => {}
        }
    }
    s.len()
}

/// A group's items at its top level (commas inside nested braces kept).
fn split_top(s: &str) -> Vec<&str> {
    let (mut out, mut depth, mut from) = (Vec::new(), 0, 0);
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                out.push(s[from..i].trim());
                from = i + 1;
            }
            _ => {}
        }
    }
    out.push(s[from..].trim());
    out
}

/// `a::b::C<…>` → `[a, b, C]`.
fn segments(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = s.trim_start();
    loop {
        let end = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        if end == 0 {
            break;
        }
        out.push(rest[..end].to_string());
        match rest[end..].strip_prefix("::") {
            Some(next) if !next.starts_with('{') => rest = next,
            _ => break,
        }
    }
    out
}

/// What the checker found wrong.
fn violations(architecture: &str, src: &Path) -> Vec<String> {
    let layers = layers(architecture);
    let files = sources(src);
    let mut wrong = Vec::new();

    // Every top-level module has a layer.
    let tops: BTreeSet<&str> = files
        .iter()
        .filter_map(|f| f.path.first().map(String::as_str))
        .filter(|t| !matches!(*t, "main" | "lib" | "bin"))
        .collect();
    for t in &tops {
        if !layers.contains_key(*t) {
            wrong.push(format!(
                "src/{t} has no row in ARCHITECTURE.md's Layers table"
            ));
        }
    }

    // Arrows between modules point down.
    let mut seen = BTreeSet::new();
    for f in &files {
        let Some(from) = f.path.first() else { continue };
        let Some(&lf) = layers.get(from) else {
            continue;
        };
        for p in crate_paths(&f.code) {
            let to = &p[0];
            if to == from {
                continue;
            }
            let Some(&lt) = layers.get(to) else { continue }; // a macro or a re-export
            if lt <= lf && seen.insert((from.clone(), to.clone())) {
                wrong.push(format!(
                    "src/{} uses crate::{to} (layer {lt}) from layer {lf}: arrows point down",
                    f.path.join("/")
                ));
            }
        }
    }

    // No circle among the files of one module.
    for top in &tops {
        let mine: Vec<&Source> = files
            .iter()
            .filter(|f| f.path.first().map(String::as_str) == Some(*top))
            .collect();
        let children: BTreeSet<String> =
            mine.iter().filter_map(|f| f.path.get(1).cloned()).collect();
        if children.is_empty() {
            continue;
        }
        // Names the module's mod.rs re-exports: `pub use child::Name;`.
        let mut reexported = BTreeMap::new();
        if let Some(root) = mine.iter().find(|f| f.path.len() == 1) {
            for line in root.code.lines() {
                let line = line.trim();
                let Some(rest) = line.strip_prefix("pub use ") else {
                    continue;
                };
                let seg = segments(rest.trim_start_matches("self::"));
                if seg.len() >= 2 && children.contains(&seg[0]) {
                    reexported.insert(seg[seg.len() - 1].clone(), seg[0].clone());
                }
            }
        }
        let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for f in mine.iter().filter(|f| f.path.len() >= 2) {
            let me = &f.path[1];
            let mut targets = Vec::new();
            for p in crate_paths(&f.code) {
                if p[0] == **top && p.len() >= 2 {
                    targets.push(p[1].clone());
                }
            }
            // `super::x` from a direct child names a sibling (or the parent's item).
            if f.path.len() == 2 {
                let mut rest = f.code.as_str();
                while let Some(at) = rest.find("super::") {
                    rest = &rest[at + "super::".len()..];
                    let seg = segments(rest);
                    if let Some(first) = seg.first() {
                        targets.push(first.clone());
                    }
                }
            }
            for t in targets {
                let t = reexported.get(&t).cloned().unwrap_or(t);
                if children.contains(&t) && &t != me {
                    edges.entry(me.clone()).or_default().insert(t);
                }
            }
        }
        if let Some(circle) = find_cycle(&edges) {
            wrong.push(format!(
                "src/{top}: its files use each other in a circle: {}",
                circle.join(" → ")
            ));
        }
    }
    wrong
}

/// A circle in the graph, if there is one.
fn find_cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = stack.iter().position(|s| s == n) {
            let mut circle = stack[at..].to_vec();
            circle.push(n.to_string());
            return Some(circle);
        }
        if done.contains(n) {
            return None;
        }
        stack.push(n.to_string());
        for next in edges.get(n).into_iter().flatten() {
            if let Some(c) = visit(next, edges, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for n in edges.keys() {
        if let Some(c) = visit(n, edges, &mut Vec::new(), &mut done) {
            return Some(c);
        }
    }
    None
}

#[test]
fn every_import_points_down_the_layers_of_architecture_md() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let architecture = std::fs::read_to_string(root.join("ARCHITECTURE.md")).unwrap();
    let wrong = violations(&architecture, &root.join("src"));
    assert!(
        wrong.is_empty(),
        "the code and ARCHITECTURE.md's layers disagree:\n  {}",
        wrong.join("\n  ")
    );
}

/// A made-up crate and map, to show the checker finds what it must.
fn tree(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (path, text) in files {
        let p = dir.path().join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    dir
}

const MAP: &str = "# x\n\n## Layers\n\n| layer | modules | what |\n|---|---|---|\n\
    | 1 | `door` | the door |\n| 2 | `core` | the core |\n| 3 | `leaf` | a leaf |\n\n## After\n";

#[test]
fn the_checker_passes_a_tree_whose_arrows_point_down() {
    let t = tree(&[
        (
            "door.rs",
            "use crate::core::Core;\nuse crate::{leaf::x, core};\n",
        ),
        (
            "core/mod.rs",
            "mod a;\nmod b;\npub use a::Thing;\nuse crate::leaf;\n",
        ),
        ("core/a.rs", "use super::b::Other;\npub struct Thing;\n"),
        (
            "core/b.rs",
            "pub struct Other;\n// uses crate::door in a comment only\n",
        ),
        (
            "leaf.rs",
            "pub fn x() {}\n#[cfg(test)]\nmod tests { use crate::door; }\n",
        ),
    ]);
    assert_eq!(violations(MAP, t.path()), Vec::<String>::new());
}

#[test]
fn the_checker_finds_an_upward_import_a_grouped_one_and_a_missing_row() {
    let t = tree(&[
        ("door.rs", ""),
        ("core.rs", "fn f() { let _ = crate::door::x(); }\n"),
        ("leaf.rs", "use crate::{core::Core, door};\n"),
        ("extra.rs", ""),
    ]);
    let wrong = violations(MAP, t.path());
    assert!(
        wrong
            .iter()
            .any(|w| w.contains("src/core uses crate::door")),
        "{wrong:?}"
    );
    assert!(
        wrong
            .iter()
            .any(|w| w.contains("src/leaf uses crate::core")),
        "{wrong:?}"
    );
    assert!(
        wrong
            .iter()
            .any(|w| w.contains("src/leaf uses crate::door")),
        "{wrong:?}"
    );
    assert!(
        wrong.iter().any(|w| w.contains("src/extra has no row")),
        "{wrong:?}"
    );
    assert_eq!(wrong.len(), 4, "{wrong:?}");
}

#[test]
fn the_checker_finds_a_circle_through_a_re_export() {
    let t = tree(&[
        ("door.rs", ""),
        ("leaf.rs", ""),
        (
            "core/mod.rs",
            "mod a;\nmod b;\nmod c;\npub use c::Answered;\n",
        ),
        ("core/a.rs", "use super::b::B;\n"),
        ("core/b.rs", "use crate::core::Answered;\n"),
        (
            "core/c.rs",
            "pub struct Answered;\nfn f() { super::a::g(); }\n",
        ),
    ]);
    let wrong = violations(MAP, t.path());
    assert_eq!(wrong.len(), 1, "{wrong:?}");
    assert!(wrong[0].contains("a → b → c → a"), "{wrong:?}");
}

/// The names in ARCHITECTURE.md's "How a request flows": every `a::b` path and every
/// backticked identifier, by its last segment.
fn flow_names(architecture: &str) -> BTreeSet<String> {
    let section = architecture
        .split("\n## How a request flows")
        .nth(1)
        .expect("ARCHITECTURE.md has a \"## How a request flows\" section");
    let section = section.split("\n## ").next().unwrap_or(section);
    let mut names = BTreeSet::new();
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let chars: Vec<char> = section.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        if !(chars[i].is_ascii_alphabetic() || chars[i] == '_')
            || (i > 0 && (ident(chars[i - 1]) || chars[i - 1] == '-'))
        {
            i += 1;
            continue;
        }
        // A run of identifiers joined by `::`.
        let mut segments = Vec::new();
        let mut j = i;
        loop {
            let start = j;
            while j < chars.len() && ident(chars[j]) {
                j += 1;
            }
            segments.push(chars[start..j].iter().collect::<String>());
            if j + 2 < chars.len() && chars[j] == ':' && chars[j + 1] == ':' && ident(chars[j + 2])
            {
                j += 2;
            } else {
                break;
            }
        }
        let backticked = i > 0 && chars[i - 1] == '`' && chars.get(j) == Some(&'`');
        if segments.len() > 1 || backticked {
            names.insert(segments.last().unwrap().clone());
        }
        i = j;
    }
    names
}

/// Whether `name` is defined under `src/`: a function, a type, a trait, a module
/// (a file or folder of that name, or `mod name`).
fn defined(name: &str, files: &[(PathBuf, String)]) -> bool {
    let kinds = [
        "fn ", "struct ", "enum ", "trait ", "type ", "mod ", "const ",
    ];
    files.iter().any(|(path, text)| {
        path.file_stem().is_some_and(|s| s == name)
            || path
                .parent()
                .and_then(|p| p.file_name())
                .is_some_and(|d| d == name)
            || kinds.iter().any(|k| {
                text.match_indices(&format!("{k}{name}")).any(|(at, m)| {
                    !text[at + m.len()..].starts_with(|c: char| c.is_alphanumeric() || c == '_')
                })
            })
    })
}

fn all_sources(dir: &Path, out: &mut Vec<(PathBuf, String)>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            all_sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            let text = std::fs::read_to_string(&p).unwrap();
            out.push((p, text));
        }
    }
}

#[test]
fn every_function_the_request_flows_name_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let architecture = std::fs::read_to_string(root.join("ARCHITECTURE.md")).unwrap();
    let mut files = Vec::new();
    all_sources(&root.join("src"), &mut files);
    let names = flow_names(&architecture);
    assert!(names.len() > 40, "{names:?}");
    let missing: Vec<&String> = names.iter().filter(|n| !defined(n, &files)).collect();
    assert!(
        missing.is_empty(),
        "ARCHITECTURE.md's request flows name what src/ does not define: {missing:?}"
    );
}

#[test]
fn the_flow_check_finds_a_name_that_is_not_there() {
    let text = "\n## How a request flows\n\n`Core::validate` → `no_such_function` and \
        oip::infer, a --flag-name and plain words\n\n## After\n";
    let names = flow_names(text);
    assert_eq!(
        names,
        ["infer", "no_such_function", "validate"]
            .map(String::from)
            .into()
    );
    let files = vec![(
        PathBuf::from("src/oip/mod.rs"),
        "pub async fn infer() {}\nfn validate_for() {}\n".to_string(),
    )];
    assert!(defined("infer", &files));
    assert!(defined("oip", &files));
    assert!(
        !defined("validate", &files),
        "a longer name is not the name"
    );
    assert!(!defined("no_such_function", &files));
}

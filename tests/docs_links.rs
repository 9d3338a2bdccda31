//! The README, ARCHITECTURE.md and the pages under `docs/` link to each other and to
//! files of the repository: every relative link must reach a file that exists, and
//! every `#anchor` a heading of its page (GitHub's slugs).

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// GitHub's anchor of a heading: lower case, punctuation but `-` and `_` dropped,
/// spaces as `-`.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == '-' || *c == '_' || *c == ' ')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

fn anchors(md: &str) -> Vec<String> {
    let mut in_code = false;
    md.lines()
        .filter(|l| {
            if l.starts_with("```") {
                in_code = !in_code;
            }
            !in_code
        })
        .filter_map(|l| {
            let t = l.trim_start_matches('#');
            (l.starts_with('#') && t.starts_with(' ')).then(|| slug(t))
        })
        .collect()
}

/// `(label, target)` of every Markdown link outside code blocks.
fn links(md: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_code = false;
    for line in md.lines() {
        if line.starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if in_code {
            continue;
        }
        let mut rest = line;
        while let Some(i) = rest.find("](") {
            let after = &rest[i + 2..];
            let Some(end) = after.find(')') else { break };
            out.push(after[..end].to_string());
            rest = &after[end..];
        }
    }
    out
}

fn pages() -> Vec<PathBuf> {
    let mut v = vec![root().join("README.md"), root().join("ARCHITECTURE.md")];
    for e in std::fs::read_dir(root().join("docs")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "md") {
            v.push(p);
        }
    }
    v
}

fn broken(page: &Path) -> Vec<String> {
    let md = std::fs::read_to_string(page).unwrap();
    let dir = page.parent().unwrap();
    let mut bad = Vec::new();
    for target in links(&md) {
        if target.contains("://") || target.starts_with("mailto:") {
            continue;
        }
        let (path, anchor) = target.split_once('#').unwrap_or((&target, ""));
        let file = if path.is_empty() {
            page.to_path_buf()
        } else {
            dir.join(path)
        };
        if !file.exists() {
            bad.push(format!("{target}: no such file"));
            continue;
        }
        if !anchor.is_empty() && file.extension().is_some_and(|x| x == "md") {
            let text = std::fs::read_to_string(&file).unwrap();
            if !anchors(&text).iter().any(|a| a == anchor) {
                bad.push(format!("{target}: no heading with that anchor"));
            }
        }
    }
    bad
}

#[test]
fn every_relative_link_reaches_its_file_and_heading() {
    let mut all = Vec::new();
    for p in pages() {
        for b in broken(&p) {
            all.push(format!(
                "{}: {b}",
                p.strip_prefix(root()).unwrap().display()
            ));
        }
    }
    assert!(all.is_empty(), "broken links:\n{}", all.join("\n"));
}

#[test]
fn the_check_finds_a_broken_link() {
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("p.md");
    std::fs::write(
        dir.path().join("q.md"),
        "# Title\n\n## A heading, with punctuation\n",
    )
    .unwrap();
    std::fs::write(
        &page,
        "[ok](q.md#a-heading-with-punctuation) [gone](nope.md) [bad](q.md#missing) [self](#x)\n\n# X\n",
    )
    .unwrap();
    let b = broken(&page);
    assert_eq!(b.len(), 2, "{b:?}");
    assert!(b[0].starts_with("nope.md") && b[1].starts_with("q.md#missing"));
}

#[test]
fn the_readme_is_a_front_door() {
    let lines = std::fs::read_to_string(root().join("README.md"))
        .unwrap()
        .lines()
        .count();
    assert!(lines <= 250, "README.md has {lines} lines");
}

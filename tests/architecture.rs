//! The module layering of `src/` that docs/architecture.md draws, checked on the source text: no
//! import circle between top-level modules, the models (`mmdit`, `vae`, `text`) take their layers
//! from `nn` and never from each other, and nothing below the pipeline reaches up into it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top-level module -> the top-level modules its code (not its tests or comments) names.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    fn walk(dir: &Path, files: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, files);
            } else if p.extension().is_some_and(|x| x == "rs") {
                files.push(p);
            }
        }
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    walk(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(&src).unwrap();
        let first = rel.iter().next().unwrap().to_str().unwrap();
        let module = first.trim_end_matches(".rs").to_string();
        if module == "lib" || module == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        // Unit tests may compare against anything; the layering is about the code itself.
        let code = text.split("#[cfg(test)]\nmod tests").next().unwrap();
        let deps = graph.entry(module.clone()).or_default();
        for line in code.lines().map(str::trim) {
            if line.starts_with("//") {
                continue;
            }
            for (i, _) in line.match_indices("crate::") {
                let rest = &line[i + "crate::".len()..];
                let names: Vec<&str> = match rest.strip_prefix('{') {
                    Some(group) => group
                        .split('}')
                        .next()
                        .unwrap()
                        .split(',')
                        .map(|n| n.trim().split("::").next().unwrap())
                        .collect(),
                    None => vec![rest
                        .split(|c: char| !c.is_alphanumeric() && c != '_')
                        .next()
                        .unwrap()],
                };
                for n in names {
                    // `crate::Error` and the like are re-exports of the error module.
                    let n = if n.starts_with(char::is_uppercase) {
                        "error"
                    } else {
                        n
                    };
                    if !n.is_empty() && n != module {
                        deps.insert(n.to_string());
                    }
                }
            }
        }
    }
    graph
}

#[test]
fn no_import_circle_between_top_level_modules() {
    let g = imports();
    // Depth-first search for a back edge.
    fn visit<'a>(
        n: &'a str,
        g: &'a BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) {
        if let Some(at) = path.iter().position(|p| *p == n) {
            panic!(
                "import circle: {}",
                [&path[at..], &[n]].concat().join(" -> ")
            );
        }
        if !done.insert(n) {
            return;
        }
        path.push(n);
        for d in g.get(n).into_iter().flatten() {
            visit(d, g, path, done);
        }
        path.pop();
    }
    let mut done = BTreeSet::new();
    for n in g.keys() {
        visit(n, &g, &mut Vec::new(), &mut done);
    }
    for (m, d) in &g {
        println!(
            "{m} -> {}",
            d.iter().cloned().collect::<Vec<_>>().join(", ")
        );
    }
}

#[test]
fn models_take_layers_from_nn_and_nothing_reaches_up() {
    let g = imports();
    let forbidden: &[(&str, &[&str])] = &[
        (
            "cpu",
            &["nn", "mmdit", "vae", "text", "pipeline", "presets"],
        ),
        (
            "cuda",
            &["nn", "mmdit", "vae", "text", "pipeline", "presets"],
        ),
        (
            "nn",
            &["mmdit", "vae", "text", "pipeline", "presets", "loader"],
        ),
        ("mmdit", &["vae", "text", "pipeline", "presets", "loader"]),
        ("vae", &["mmdit", "text", "pipeline", "presets", "loader"]),
        ("text", &["mmdit", "vae", "pipeline", "presets", "loader"]),
        ("loader", &["pipeline", "presets"]),
        ("output", &["pipeline", "presets"]),
        ("pipeline", &["presets", "bench"]),
    ];
    for (module, not) in forbidden {
        let deps = &g[*module];
        for n in *not {
            assert!(!deps.contains(*n), "{module} imports {n}");
        }
    }
}

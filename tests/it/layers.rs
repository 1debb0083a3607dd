//! The layer order of `src/`: the ```layers block of ARCHITECTURE.md lists the top-level modules
//! from the top of the stack to the bottom, and a module may name (`crate::x`) only modules on
//! lower lines. Two modules on one line may not name each other, and no module may name a
//! re-export of the crate root (`crate::Config`), which would hide the edge. With a strict order
//! there is no cycle. Test code (`tests.rs` files and what follows `#[cfg(test)]`) may name anything.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Each module of the block and its height: 0 for the bottom line.
fn layer_order() -> BTreeMap<String, usize> {
    let text = std::fs::read_to_string(root().join("ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let block = text.split("```layers\n").nth(1).expect("ARCHITECTURE.md has a ```layers block");
    let block = block.split("```").next().expect("the block ends");
    let lines: Vec<&str> = block.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let mut order = BTreeMap::new();
    for (i, line) in lines.iter().enumerate() {
        for module in line.split_whitespace() {
            let previous = order.insert(module.to_owned(), lines.len() - 1 - i);
            assert!(previous.is_none(), "`{module}` is on two lines of the layers block");
        }
    }
    order
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src/ is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file of `src/` belongs to, or `None` for the crate roots, the
/// binaries and test files.
fn module_of(relative: &Path) -> Option<String> {
    let first = relative.components().next()?.as_os_str().to_str()?.to_owned();
    if first == "bin" || relative.file_name().is_some_and(|n| n == "tests.rs") {
        return None;
    }
    let module = first.trim_end_matches(".rs").to_owned();
    (module != "lib" && module != "main").then_some(module)
}

/// What a reference to a re-export of the crate root is recorded as.
const ROOT: &str = "(the crate root)";

/// Every `crate::x` a file's non-test code names, with its line number.
fn crate_references(source: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (number, line) in source.lines().enumerate() {
        let code = line.trim_start();
        if code.starts_with("#[cfg(test)]") {
            break;
        }
        if code.starts_with("//") {
            continue;
        }
        for (at, _) in line.match_indices("crate::") {
            let preceded_by_word = line[..at].chars().next_back().is_some_and(|c| c.is_alphanumeric() || c == '_');
            if preceded_by_word {
                continue; // `session_authority::crate::`-like text or an identifier ending in `crate`.
            }
            let rest = &line[at + "crate::".len()..];
            // A re-export of the crate root (`crate::Config`) hides the module it comes from, so
            // it is recorded as the root, which no module may name.
            if rest.starts_with(|c: char| c.is_ascii_uppercase()) {
                found.push((number + 1, ROOT.to_owned()));
                continue;
            }
            let name: String = rest.chars().take_while(|c| c.is_ascii_lowercase() || *c == '_').collect();
            if !name.is_empty() {
                found.push((number + 1, name));
            }
        }
    }
    found
}

#[test]
fn every_module_names_only_modules_below_it() {
    let order = layer_order();
    let src = root().join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut unplaced = Vec::new();
    let mut upward = Vec::new();
    let mut edges = 0;
    for file in &files {
        let relative = file.strip_prefix(&src).expect("below src/");
        let Some(module) = module_of(relative) else { continue };
        let Some(&height) = order.get(&module) else {
            unplaced.push(module);
            continue;
        };
        let source = std::fs::read_to_string(file).expect("a readable source file");
        for (line, target) in crate_references(&source) {
            if target == module {
                continue;
            }
            edges += 1;
            if target == ROOT {
                upward.push(format!(
                    "src/{}:{line}: `{module}` names a re-export of the crate root; name its module instead",
                    relative.display()
                ));
                continue;
            }
            match order.get(&target) {
                Some(&below) if below < height => {}
                Some(_) => {
                    upward.push(format!("src/{}:{line}: `{module}` names `crate::{target}`", relative.display()))
                }
                None => unplaced.push(target),
            }
        }
    }
    unplaced.sort();
    unplaced.dedup();
    assert!(unplaced.is_empty(), "modules missing from the layers block of ARCHITECTURE.md: {unplaced:?}");
    assert!(upward.is_empty(), "imports that go up or sideways in the layer order:\n{}", upward.join("\n"));
    assert!(edges > 50, "the scan found only {edges} cross-module references: is it reading src/?");
    for module in order.keys() {
        let exists = src.join(format!("{module}.rs")).exists() || src.join(module).join("mod.rs").exists();
        assert!(exists, "the layers block names `{module}`, which is not a module of src/");
    }
}

#[test]
fn the_scan_sees_an_upward_reference() {
    let source = "use crate::store::DynSessionStore;\n// crate::app in a comment\nfn f() { crate::grpc::x(); }\nfn g(c: &crate::Config) {}\n#[cfg(test)]\nmod tests { use crate::app; }\n";
    let names: Vec<String> = crate_references(source).into_iter().map(|(_, n)| n).collect();
    assert_eq!(names, ["store", "grpc", ROOT]);
    assert_eq!(module_of(Path::new("store/embedded/commit.rs")).as_deref(), Some("store"));
    assert_eq!(module_of(Path::new("session/tests.rs")), None);
    assert_eq!(module_of(Path::new("bin/loadgen/main.rs")), None);
}

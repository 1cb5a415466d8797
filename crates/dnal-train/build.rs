//! Compiles every recipe of `configs/` into the crate: writes the list `recipes::RECIPES`
//! includes, so that a new recipe file needs no line of code.

use std::path::Path;

fn main() {
    let dir =
        Path::new(&std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo")).join("configs");
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut recipes: Vec<(String, String)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("a readable configs/ entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "toml"))
        .map(|path| {
            let name = path
                .file_stem()
                .expect("a file name")
                .to_string_lossy()
                .into_owned();
            (name, path.display().to_string())
        })
        .collect();
    recipes.sort();
    let mut code = String::from("&[\n");
    for (name, path) in &recipes {
        code += &format!("    Recipe {{ name: {name:?}, text: include_str!({path:?}) }},\n");
    }
    code += "]\n";
    let out = Path::new(&std::env::var("OUT_DIR").expect("set by cargo")).join("recipes.rs");
    std::fs::write(&out, code).unwrap_or_else(|e| panic!("{}: {e}", out.display()));
}

//! A checkpoint's text files: the first byte picks `progress.json` (parsed and validated
//! against the MNIST demo's recipe) or `SHA256SUMS` (checked against a small checkpoint
//! folder); an error or a result, never a panic.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use dnal_train::checkpoint::{validate_progress, verify};
use dnal_train::progress::Progress;
use dnal_train::{TrainConfig, recipes};
use libfuzzer_sys::fuzz_target;

fn recipe() -> &'static TrainConfig {
    static CFG: OnceLock<TrainConfig> = OnceLock::new();
    CFG.get_or_init(|| recipes::resolve(Some("mnist-demo"), None, &[]).unwrap())
}

fn folder() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("dnal-fuzz-ckpt-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("model")).unwrap();
        std::fs::write(dir.join("progress.json"), "{}").unwrap();
        std::fs::write(dir.join("config.toml"), "x").unwrap();
        std::fs::write(dir.join("model").join("model.bpk"), [1u8, 2, 3]).unwrap();
        dir
    })
}

fuzz_target!(|data: &[u8]| {
    let [pick, rest @ ..] = data else {
        return;
    };
    if pick % 2 == 0 {
        let Ok(text) = std::str::from_utf8(rest) else {
            return;
        };
        if let Ok(progress) = serde_json::from_str::<Progress>(text) {
            let _ = validate_progress(&progress, recipe(), Path::new("progress.json"));
        }
    } else {
        let dir = folder();
        std::fs::write(dir.join("SHA256SUMS"), rest).unwrap();
        let _ = verify(dir);
    }
});

//! Any bytes as the `model.bpk` of a pruned MNIST CNN (the demo's widths): a network with the
//! config's shapes, or an error naming the file, never a panic.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use burn::prelude::*;
use dnal_zoo::{Network, PlainCnn};
use libfuzzer_sys::fuzz_target;

const CONFIG: &str = r#"{"in_channels": 1, "image_size": 28, "widths": [13, 17, 22, 40],
"pool_after": [1, 3], "global_pool": true, "hidden": [], "hidden_bn": true, "num_classes": 10}"#;

fn folder() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("dnal-fuzz-bpk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), CONFIG).unwrap();
        dir
    })
}

fuzz_target!(|data: &[u8]| {
    let dir = folder();
    std::fs::write(dnal_zoo::network::weights_path(dir), data).unwrap();
    let device = Device::default();
    if let Ok(net) = dnal_zoo::load::<PlainCnn>(dir, |c| <PlainCnn as Network>::build(c, &device)) {
        assert_eq!(net.config().widths, vec![13, 17, 22, 40]);
    }
});

//! Any text as an `architecture.json`, checked against the MNIST CNN and, if it fits, applied
//! to it as masks: an error or a result, never a panic.
#![no_main]

use std::sync::OnceLock;

use burn::prelude::*;
use dnal_core::Architecture;
use dnal_zoo::{Network, PlainCnn, PlainCnnConfig};
use libfuzzer_sys::fuzz_target;

fn model() -> &'static PlainCnn {
    static MODEL: OnceLock<PlainCnn> = OnceLock::new();
    MODEL.get_or_init(|| {
        <PlainCnn as Network>::build(&PlainCnnConfig::mnist_cnn(), &Device::default()).unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(arch) = Architecture::from_json(text) else {
        return;
    };
    let _ = arch.summary();
    if arch.check_matches(model()).is_ok() {
        let _ = model().clone().arch_cost(&arch);
    }
});

//! Any text as a recipe (TOML): a validated config or an error, never a panic; a config that
//! parses round-trips through its own TOML.
#![no_main]

use dnal_train::TrainConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) = TrainConfig::from_toml(text, "fuzz.toml") {
        let again = TrainConfig::from_toml(&cfg.to_toml(), "round trip").unwrap();
        assert_eq!(again, cfg);
    }
});

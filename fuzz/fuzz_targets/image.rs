//! Any bytes as an image-folder file (JPEG, PNG, or anything else): an RGB image whose pixel
//! count matches its size, or an error, never a panic.
#![no_main]

use std::path::Path;
use std::sync::Once;

use libfuzzer_sys::fuzz_target;

/// libFuzzer aborts on every panic, even a caught one. One panic is known and handled: zune-jpeg
/// 0.5.15 overflows an i32 (`dc_prediction * qt_table[0]`) with overflow checks on, which
/// `decode_rgb_bytes` turns into an error (regression test in dnal-data's `formats.rs`); it
/// is let through so that the fuzzer goes on past it. Any other panic still aborts.
fn allow_known_decoder_overflow() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let abort = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let known = info
                .location()
                .is_some_and(|l| l.file().contains("zune-jpeg"))
                && info
                    .to_string()
                    .contains("attempt to multiply with overflow");
            if !known {
                abort(info);
            }
        }));
    });
}

fuzz_target!(|data: &[u8]| {
    allow_known_decoder_overflow();
    if let Ok(img) = dnal_data::folder::decode_rgb_bytes(Path::new("fuzz.img"), data) {
        assert_eq!(img.channels, 3);
        assert_eq!(img.pixels.len(), img.height * img.width * 3);
    }
});

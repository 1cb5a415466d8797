//! Any bytes as an image-folder file (JPEG, PNG, or anything else): an RGB image whose pixel
//! count matches its size, or an error, never a panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(img) = dnal_data::folder::decode_rgb_bytes(Path::new("fuzz.img"), data) {
        assert_eq!(img.channels, 3);
        assert_eq!(img.pixels.len(), img.height * img.width * 3);
    }
});

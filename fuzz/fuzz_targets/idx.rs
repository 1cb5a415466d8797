//! Any bytes given to the IDX parser give dimensions and data, or an error, never a panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for rank in 1..=4 {
        if let Ok((dims, bytes)) = dnal_data::mnist::parse_idx(Path::new("fuzz-idx"), data, rank) {
            assert_eq!(dims.iter().product::<usize>(), bytes.len());
        }
    }
});

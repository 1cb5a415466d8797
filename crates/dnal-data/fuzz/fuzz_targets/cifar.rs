//! Any bytes given to the CIFAR record parser give a data set or an error, never a panic.
#![no_main]

use std::path::Path;

use dnal_data::CifarKind;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for kind in [CifarKind::Cifar10, CifarKind::Cifar100, CifarKind::Cifar100Coarse] {
        let records = data.len() / kind.record_bytes();
        let _ = dnal_data::cifar::parse_file(kind, Path::new("fuzz.bin"), data, records);
        let _ = dnal_data::cifar::parse_file(kind, Path::new("fuzz.bin"), data, records + 1);
    }
});

//! Any bytes as a CIFAR `.tar.gz` (or `.tar`) archive of one-record files: a data set or an
//! error, never a panic (gzip, tar headers, member sizes, then the records).
#![no_main]

use dnal_data::Split;
use dnal_data::{CifarKind, cifar::load_cifar_sized};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("dnal-fuzz-{}.tar.gz", std::process::id()));
    std::fs::write(&path, data).unwrap();
    for split in [Split::Train, Split::Test] {
        let _ = load_cifar_sized(CifarKind::Cifar10, &path, split, 1);
    }
});

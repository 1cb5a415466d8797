//! The CIFAR record parser on files of the right size: the first byte picks the variant, the
//! second the number of records, and the rest (repeated to fill the records) gives labels and
//! pixels, so that mutations reach the label checks rather than the size check. The raw bytes
//! are also parsed as they are, for the size errors. A data set or an error, never a panic.
#![no_main]

use std::path::Path;

use dnal_data::CifarKind;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [pick, count, rest @ ..] = data else {
        return;
    };
    let kind = [
        CifarKind::Cifar10,
        CifarKind::Cifar100,
        CifarKind::Cifar100Coarse,
    ][*pick as usize % 3];
    let records = 1 + *count as usize % 3;
    let path = Path::new("fuzz.bin");
    if !rest.is_empty() {
        let sized: Vec<u8> = rest
            .iter()
            .copied()
            .cycle()
            .take(records * kind.record_bytes())
            .collect();
        if let Ok(set) = dnal_data::cifar::parse_file(kind, path, &sized, records) {
            assert_eq!(set.len(), records);
        }
    }
    let _ = dnal_data::cifar::parse_file(kind, path, rest, records);
});

//! Generators of small files in the real formats.
#![allow(dead_code)]

use std::io::Write;
use std::path::Path;

use dnal_data::CifarKind;

/// `n` CIFAR records; image `i` has every byte of channel `c` equal to `(i * 7 + c) % 256`, its
/// label is `i % classes` (fine label; coarse label `i % 20`).
pub fn cifar_records(kind: CifarKind, n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..n {
        match kind {
            CifarKind::Cifar10 => out.push((i % 10) as u8),
            _ => {
                out.push((i % 20) as u8);
                out.push((i % 100) as u8);
            }
        }
        for c in 0..3 {
            out.extend(std::iter::repeat_n(((i * 7 + c) % 256) as u8, 1024));
        }
    }
    out
}

/// Writes an extracted CIFAR-10 folder with `n` records per file under `root`.
pub fn write_cifar10_dir(root: &Path, n: usize) {
    let dir = root.join("cifar-10-batches-bin");
    std::fs::create_dir_all(&dir).unwrap();
    for i in 1..=5 {
        std::fs::write(
            dir.join(format!("data_batch_{i}.bin")),
            cifar_records(CifarKind::Cifar10, n),
        )
        .unwrap();
    }
    std::fs::write(
        dir.join("test_batch.bin"),
        cifar_records(CifarKind::Cifar10, n),
    )
    .unwrap();
    let names = "airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n";
    std::fs::write(dir.join("batches.meta.txt"), names).unwrap();
}

/// A `.tar.gz` holding `folder/` with the given members.
pub fn targz(folder: &str, members: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    for (name, data) in members {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, format!("{folder}/{name}"), data.as_slice())
            .unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap()
}

/// The official CIFAR-10 archive layout with `n` records per file.
pub fn cifar10_targz(n: usize) -> Vec<u8> {
    let mut members: Vec<(String, Vec<u8>)> = (1..=5)
        .map(|i| {
            (
                format!("data_batch_{i}.bin"),
                cifar_records(CifarKind::Cifar10, n),
            )
        })
        .collect();
    members.push((
        "test_batch.bin".into(),
        cifar_records(CifarKind::Cifar10, n),
    ));
    let refs: Vec<(&str, Vec<u8>)> = members
        .iter()
        .map(|(a, b)| (a.as_str(), b.clone()))
        .collect();
    targz("cifar-10-batches-bin", &refs)
}

/// An IDX file of unsigned bytes.
pub fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}

/// Gzip of a buffer.
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(bytes).unwrap();
    gz.finish().unwrap()
}

/// Writes an RGB image of `w` x `h` whose pixels encode their position.
pub fn write_image(path: &Path, w: u32, h: u32) {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, 128])
    });
    img.save(path).unwrap();
}

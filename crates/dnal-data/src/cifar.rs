//! CIFAR-10 and CIFAR-100 in their official binary format, from the extracted folder or from
//! the `.tar.gz` archive itself.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::Split;
use crate::error::{DataError, Result};
use crate::image::{ImageSet, gunzip, numbered_classes, read_file};

/// Bytes of one image (3 x 32 x 32, planar).
pub const IMAGE_BYTES: usize = 3 * 32 * 32;

/// CIFAR-10 or CIFAR-100 (and, for CIFAR-100, which labels).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CifarKind {
    /// 10 classes; records of 1 label byte + 3072 pixel bytes.
    Cifar10,
    /// 100 fine classes; records of coarse + fine label bytes + 3072 pixel bytes.
    Cifar100,
    /// CIFAR-100 with its 20 coarse (super-class) labels.
    Cifar100Coarse,
}

impl CifarKind {
    /// The folder the official archive extracts to.
    pub fn folder(self) -> &'static str {
        match self {
            CifarKind::Cifar10 => "cifar-10-batches-bin",
            _ => "cifar-100-binary",
        }
    }

    /// The files of one split.
    pub fn files(self, split: Split) -> Vec<String> {
        match (self, split) {
            (CifarKind::Cifar10, Split::Train) => {
                (1..=5).map(|i| format!("data_batch_{i}.bin")).collect()
            }
            (CifarKind::Cifar10, Split::Test) => vec!["test_batch.bin".into()],
            (_, Split::Train) => vec!["train.bin".into()],
            (_, Split::Test) => vec!["test.bin".into()],
        }
    }

    /// Images in each file of a split (the official files are exactly this size).
    pub fn images_per_file(self, split: Split) -> usize {
        match (self, split) {
            (CifarKind::Cifar10, _) | (_, Split::Test) => 10_000,
            (_, Split::Train) => 50_000,
        }
    }

    /// Bytes of one record.
    pub fn record_bytes(self) -> usize {
        match self {
            CifarKind::Cifar10 => 1 + IMAGE_BYTES,
            _ => 2 + IMAGE_BYTES,
        }
    }

    /// Number of classes.
    pub fn num_classes(self) -> usize {
        match self {
            CifarKind::Cifar10 => 10,
            CifarKind::Cifar100 => 100,
            CifarKind::Cifar100Coarse => 20,
        }
    }

    fn names_file(self) -> &'static str {
        match self {
            CifarKind::Cifar10 => "batches.meta.txt",
            CifarKind::Cifar100 => "fine_label_names.txt",
            CifarKind::Cifar100Coarse => "coarse_label_names.txt",
        }
    }

    /// The data set's name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            CifarKind::Cifar10 => "cifar10",
            CifarKind::Cifar100 => "cifar100",
            CifarKind::Cifar100Coarse => "cifar100-coarse",
        }
    }
}

/// Loads one split of CIFAR from `path`: the folder the archive extracts to
/// (`cifar-10-batches-bin`), a folder that holds it, or the `.tar.gz` archive itself. Every file
/// must hold exactly the official number of records.
pub fn load_cifar(kind: CifarKind, path: &Path, split: Split) -> Result<ImageSet> {
    load_cifar_sized(kind, path, split, kind.images_per_file(split))
}

/// [`load_cifar`] for files in the official format but of another size (`records_per_file`
/// records each), such as a reduced copy.
pub fn load_cifar_sized(
    kind: CifarKind,
    path: &Path,
    split: Split,
    records_per_file: usize,
) -> Result<ImageSet> {
    let files = kind.files(split);
    let mut wanted: Vec<&str> = files.iter().map(String::as_str).collect();
    wanted.push(kind.names_file());
    let contents = if path.is_file() {
        read_archive(path, &wanted)?
    } else {
        let dir = resolve_dir(kind, path)?;
        wanted
            .iter()
            .filter_map(|name| {
                let p = dir.join(name);
                p.exists()
                    .then(|| read_file(&p).map(|b| (name.to_string(), (p, b))))
            })
            .collect::<Result<HashMap<_, _>>>()?
    };
    let per_file = records_per_file;
    let mut pixels = Vec::with_capacity(per_file * files.len() * IMAGE_BYTES);
    let mut labels = Vec::with_capacity(per_file * files.len());
    for name in &files {
        let (file, bytes) = contents.get(name).ok_or_else(|| DataError::Missing {
            path: path.join(name),
            hint: format!(
                "the {} binary release holds {}; download it with `cargo xtask data download {}`",
                kind.name(),
                files.join(", "),
                kind.name()
            ),
        })?;
        parse_records(kind, file, bytes, per_file, &mut pixels, &mut labels)?;
        debug_assert_eq!(labels.len() * IMAGE_BYTES, pixels.len());
    }
    let classes = contents
        .get(kind.names_file())
        .map(|(_, b)| {
            String::from_utf8_lossy(b)
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .filter(|names| names.len() == kind.num_classes())
        .unwrap_or_else(|| numbered_classes(kind.num_classes()));
    ImageSet::new([32, 32, 3], pixels, labels, classes)
}

/// Parses one CIFAR file's bytes (`records` records expected) into a data set with numbered
/// classes. `path` only names the file in errors.
pub fn parse_file(kind: CifarKind, path: &Path, bytes: &[u8], records: usize) -> Result<ImageSet> {
    let mut pixels = Vec::with_capacity(records * IMAGE_BYTES);
    let mut labels = Vec::with_capacity(records);
    parse_records(kind, path, bytes, records, &mut pixels, &mut labels)?;
    ImageSet::new(
        [32, 32, 3],
        pixels,
        labels,
        numbered_classes(kind.num_classes()),
    )
}

/// Parses the records of one file into interleaved pixels and labels.
fn parse_records(
    kind: CifarKind,
    path: &Path,
    bytes: &[u8],
    expected_images: usize,
    pixels: &mut Vec<u8>,
    labels: &mut Vec<u16>,
) -> Result<()> {
    let record = kind.record_bytes();
    if bytes.len() != expected_images * record {
        let detail = if !bytes.len().is_multiple_of(record) {
            format!(
                "ends in the middle of a record ({} bytes left over)",
                bytes.len() % record
            )
        } else {
            format!("holds {} records", bytes.len() / record)
        };
        return Err(DataError::format(
            path,
            format!(
                "wrong file size: {} bytes, expected {} ({expected_images} records of {record} bytes); the file {detail}",
                bytes.len(),
                expected_images * record
            ),
        ));
    }
    let label_byte = match kind {
        CifarKind::Cifar10 | CifarKind::Cifar100Coarse => 0,
        CifarKind::Cifar100 => 1,
    };
    for (i, rec) in bytes.chunks_exact(record).enumerate() {
        let label = rec[label_byte];
        if label as usize >= kind.num_classes() {
            return Err(DataError::format(
                path,
                format!(
                    "record {i}: label {label} is out of range for {} ({} classes)",
                    kind.name(),
                    kind.num_classes()
                ),
            ));
        }
        if kind != CifarKind::Cifar10 && rec[0] >= 20 {
            return Err(DataError::format(
                path,
                format!(
                    "record {i}: coarse label {} is out of range (20 classes)",
                    rec[0]
                ),
            ));
        }
        labels.push(label as u16);
        let planar = &rec[record - IMAGE_BYTES..];
        let plane = 32 * 32;
        let start = pixels.len();
        pixels.resize(start + IMAGE_BYTES, 0);
        let out = &mut pixels[start..];
        for p in 0..plane {
            out[3 * p] = planar[p];
            out[3 * p + 1] = planar[plane + p];
            out[3 * p + 2] = planar[2 * plane + p];
        }
    }
    Ok(())
}

fn resolve_dir(kind: CifarKind, path: &Path) -> Result<PathBuf> {
    let nested = path.join(kind.folder());
    if nested.is_dir() {
        return Ok(nested);
    }
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    Err(DataError::Missing {
        path: path.to_path_buf(),
        hint: format!(
            "expected the extracted {} folder ({}/ with {}) or the .tar.gz archive; download it with `cargo xtask data download {}`",
            kind.name(),
            kind.folder(),
            kind.files(Split::Train).join(", "),
            kind.name()
        ),
    })
}

/// Reads the wanted members (matched by file name) of a `.tar.gz` or `.tar` archive.
fn read_archive(path: &Path, wanted: &[&str]) -> Result<HashMap<String, (PathBuf, Vec<u8>)>> {
    let bytes = read_file(path)?;
    let tar_bytes = if crate::image::is_gzip(&bytes) {
        gunzip(path, &bytes)?
    } else {
        bytes
    };
    let bad = |e: std::io::Error| DataError::format(path, format!("corrupt tar archive: {e}"));
    let mut archive = tar::Archive::new(tar_bytes.as_slice());
    let mut out = HashMap::new();
    for entry in archive.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let member = entry.path().map_err(bad)?.into_owned();
        let Some(name) = member.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if wanted.contains(&name) {
            let name = name.to_string();
            let mut data = Vec::with_capacity(entry.size() as usize);
            entry.read_to_end(&mut data).map_err(bad)?;
            out.insert(name, (path.join(member), data));
        }
    }
    Ok(out)
}

//! MNIST: the bundled 5,000-digit sample, and the IDX files of MNIST and Fashion-MNIST.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::Split;
use crate::error::{DataError, Result};
use crate::image::{ImageSet, gunzip, is_gzip, numbered_classes, read_file};

/// File name of the bundled sample inside the datasets folder.
pub const BUNDLED_MNIST_FILE: &str = "mnist-5k/mnist_5k.csv.gz";
/// sha256 of the bundled sample, checked on every load.
pub const BUNDLED_MNIST_SHA256: &str =
    "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d";
/// Images per class in the bundled sample's training split (the first 400 of each class in file
/// order); the other 100 of each class form the test split: 4,000 / 1,000 images.
pub const BUNDLED_TRAIN_PER_CLASS: usize = 400;

/// The folder holding the bundled data sets: `$DNAL_DATASETS` if set, else the repository's
/// `datasets/` folder.
pub fn datasets_dir() -> PathBuf {
    match std::env::var_os("DNAL_DATASETS") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../datasets"),
    }
}

/// Loads the bundled MNIST sample (5,000 real digits, 500 per class) from
/// `datasets_dir()/mnist-5k/mnist_5k.csv.gz`, checks its sha256, and returns one split.
pub fn bundled_mnist(split: Split) -> Result<ImageSet> {
    bundled_mnist_from(&datasets_dir().join(BUNDLED_MNIST_FILE), split)
}

/// [`bundled_mnist`] from an explicit place: the `mnist_5k.csv.gz` file itself, the folder that
/// holds it (`datasets/mnist-5k`), or a datasets folder that holds `mnist-5k/`.
pub fn bundled_mnist_from(path: &Path, split: Split) -> Result<ImageSet> {
    let resolved;
    let path = if path.is_dir() {
        let file = Path::new(BUNDLED_MNIST_FILE);
        let inside = path.join(file.file_name().expect("a file name"));
        resolved = if inside.exists() {
            inside
        } else {
            path.join(file)
        };
        &resolved
    } else {
        path
    };
    let gz = read_file(path).map_err(|e| match e {
        DataError::Missing { path, .. } => DataError::Missing {
            path,
            hint: "the bundled MNIST sample ships in the repository's datasets/mnist-5k/; point data.path at that folder (or its mnist_5k.csv.gz), or set DNAL_DATASETS to the folder that holds mnist-5k/".into(),
        },
        e => e,
    })?;
    let actual = hex(&Sha256::digest(&gz));
    if actual != BUNDLED_MNIST_SHA256 {
        return Err(DataError::Checksum {
            path: path.to_path_buf(),
            algorithm: "sha256",
            expected: BUNDLED_MNIST_SHA256.into(),
            actual,
            fix: "restore it from the repository (git checkout -- datasets/mnist-5k)".into(),
        });
    }
    let all = parse_mnist_csv(path, &gunzip(path, &gz)?)?;
    let mut taken = [0usize; 10];
    let indices: Vec<usize> = all
        .labels()
        .enumerate()
        .filter_map(|(i, l)| {
            taken[l] += 1;
            let train = taken[l] <= BUNDLED_TRAIN_PER_CLASS;
            (train == (split == Split::Train)).then_some(i)
        })
        .collect();
    Ok(all.subset(&indices))
}

/// Parses rows of 784 pixel values (0-255) followed by a label (0-9).
pub fn parse_mnist_csv(path: &Path, text: &[u8]) -> Result<ImageSet> {
    let text = std::str::from_utf8(text).map_err(|_| {
        DataError::format(path, "not a text file (expected comma-separated integers)")
    })?;
    let mut pixels = Vec::with_capacity(5000 * 784);
    let mut labels = Vec::with_capacity(5000);
    for (line_no, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let at =
            |message: String| DataError::format(path, format!("line {}: {message}", line_no + 1));
        let mut fields = 0;
        for field in line.split(',') {
            let v: u32 = field
                .trim()
                .parse()
                .map_err(|_| at(format!("`{field}` is not an integer")))?;
            if fields < 784 {
                if v > 255 {
                    return Err(at(format!("pixel value {v} is outside 0-255")));
                }
                pixels.push(v as u8);
            } else if fields == 784 {
                if v > 9 {
                    return Err(at(format!("label {v} is outside 0-9")));
                }
                labels.push(v as u16);
            }
            fields += 1;
        }
        if fields != 785 {
            return Err(at(format!(
                "{fields} values, expected 785 (784 pixels and a label)"
            )));
        }
    }
    ImageSet::new([28, 28, 1], pixels, labels, numbered_classes(10))
}

/// Which IDX data set: the names of the classes differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdxKind {
    /// MNIST digits.
    Mnist,
    /// Fashion-MNIST clothes.
    FashionMnist,
}

impl IdxKind {
    fn classes(self) -> Vec<String> {
        match self {
            IdxKind::Mnist => numbered_classes(10),
            IdxKind::FashionMnist => [
                "T-shirt/top",
                "Trouser",
                "Pullover",
                "Dress",
                "Coat",
                "Sandal",
                "Shirt",
                "Sneaker",
                "Bag",
                "Ankle boot",
            ]
            .map(String::from)
            .to_vec(),
        }
    }
}

/// Loads one split of MNIST or Fashion-MNIST from `dir` holding the four standard IDX files
/// (`train-images-idx3-ubyte`, `train-labels-idx1-ubyte`, `t10k-...`), each raw or `.gz`.
pub fn load_idx(kind: IdxKind, dir: &Path, split: Split) -> Result<ImageSet> {
    let prefix = match split {
        Split::Train => "train",
        Split::Test => "t10k",
    };
    let images = read_idx_file(dir, &format!("{prefix}-images-idx3-ubyte"))?;
    let labels = read_idx_file(dir, &format!("{prefix}-labels-idx1-ubyte"))?;
    let (img_path, img) = images;
    let (lbl_path, lbl) = labels;
    let (dims, pixels) = parse_idx(&img_path, &img, 3)?;
    let (ldims, raw_labels) = parse_idx(&lbl_path, &lbl, 1)?;
    if ldims[0] != dims[0] {
        return Err(DataError::format(
            &lbl_path,
            format!(
                "{} labels for {} images in {}",
                ldims[0],
                dims[0],
                img_path.display()
            ),
        ));
    }
    if let Some(i) = raw_labels.iter().position(|&l| l > 9) {
        return Err(DataError::format(
            &lbl_path,
            format!("label {} of item {i} is outside 0-9", raw_labels[i]),
        ));
    }
    let labels = raw_labels.iter().map(|&l| l as u16).collect();
    ImageSet::new(
        [dims[1], dims[2], 1],
        pixels.to_vec(),
        labels,
        kind.classes(),
    )
}

fn read_idx_file(dir: &Path, name: &str) -> Result<(PathBuf, Vec<u8>)> {
    for candidate in [dir.join(name), dir.join(format!("{name}.gz"))] {
        if candidate.exists() {
            let bytes = read_file(&candidate)?;
            let bytes = if is_gzip(&bytes) {
                gunzip(&candidate, &bytes)?
            } else {
                bytes
            };
            return Ok((candidate, bytes));
        }
    }
    Err(DataError::Missing {
        path: dir.join(name),
        hint: format!("expected {name} or {name}.gz in {}", dir.display()),
    })
}

/// Parses an IDX file of unsigned bytes with `rank` dimensions; returns the dimensions and the
/// data.
pub fn parse_idx<'a>(path: &Path, bytes: &'a [u8], rank: usize) -> Result<(Vec<usize>, &'a [u8])> {
    let header = 4 + 4 * rank;
    if bytes.len() < 4 {
        return Err(DataError::format(
            path,
            "empty or cut short before the IDX magic number",
        ));
    }
    if bytes[0] != 0 || bytes[1] != 0 || bytes[2] != 0x08 || bytes[3] as usize != rank {
        return Err(DataError::format(
            path,
            format!(
                "bad IDX magic {:02x}{:02x}{:02x}{:02x}: expected unsigned bytes with {rank} dimension(s) (0000080{rank})",
                bytes[0], bytes[1], bytes[2], bytes[3]
            ),
        ));
    }
    if bytes.len() < header {
        return Err(DataError::format(
            path,
            format!("{} bytes is too short for an IDX header", bytes.len()),
        ));
    }
    let dims: Vec<usize> = (0..rank)
        .map(|d| u32::from_be_bytes(bytes[4 + 4 * d..8 + 4 * d].try_into().unwrap()) as usize)
        .collect();
    let expected = dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
    let data = &bytes[header..];
    if expected != Some(data.len()) {
        return Err(DataError::format(
            path,
            format!(
                "dimensions {dims:?} need {} data bytes but the file has {} (truncated or wrong file)",
                expected.map_or("too many".into(), |e| e.to_string()),
                data.len()
            ),
        ));
    }
    Ok((dims, data))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

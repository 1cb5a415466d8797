//! Downloading the CIFAR archives: progress bar, published MD5, temp file + rename, extraction,
//! and no repeated work.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use md5::{Digest, Md5};

use dnal_core::io::write_atomic_with;

use crate::cifar::CifarKind;
use crate::error::{DataError, Result};
use crate::mnist::hex;

/// One downloadable archive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Archive {
    /// Official address.
    pub url: String,
    /// File name of the archive.
    pub file_name: &'static str,
    /// Published MD5 of the archive.
    pub md5: &'static str,
    /// Folder the archive extracts to.
    pub folder: &'static str,
}

impl Archive {
    /// The official binary release of a CIFAR data set.
    pub fn cifar(kind: CifarKind) -> Self {
        match kind {
            CifarKind::Cifar10 => Self {
                url: "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz".into(),
                file_name: "cifar-10-binary.tar.gz",
                md5: "c32a1d4ab5d03f1284b67883e8d87530",
                folder: "cifar-10-batches-bin",
            },
            CifarKind::Cifar100 | CifarKind::Cifar100Coarse => Self {
                url: "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz".into(),
                file_name: "cifar-100-binary.tar.gz",
                md5: "03b5dce01913d631647c71ecec9e9cb8",
                folder: "cifar-100-binary",
            },
        }
    }

    /// The same archive from another address (a mirror).
    pub fn with_url(mut self, url: impl Into<String>) -> Self {
        self.url = url.into();
        self
    }
}

/// Name of the file that marks a completed extraction.
const DONE_MARKER: &str = ".dnal-complete";

/// Downloads `archive` into `dir` (if its verified copy is not already there), checks its MD5,
/// and extracts it (if not already done). Returns the extracted folder. Nothing partial is ever
/// left under the final names: the archive is written to a temporary file and renamed once its
/// checksum matches, and the extraction goes to a temporary folder renamed when complete.
pub fn download(archive: &Archive, dir: &Path) -> Result<PathBuf> {
    let folder = dir.join(archive.folder);
    if folder.join(DONE_MARKER).exists() {
        return Ok(folder);
    }
    std::fs::create_dir_all(dir).map_err(DataError::io(dir))?;
    let file = dir.join(archive.file_name);
    let have_verified = file.exists() && md5_of_file(&file)? == archive.md5;
    if !have_verified {
        fetch(archive, &file)?;
    }
    extract(&file, dir, archive.folder)?;
    Ok(folder)
}

fn md5_of_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(DataError::io(path))?;
    let mut hasher = Md5::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(DataError::io(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

fn fetch(archive: &Archive, dest: &Path) -> Result<()> {
    write_atomic_with(dest, |part| fetch_to(archive, part))
}

fn fetch_to(archive: &Archive, part: &Path) -> Result<()> {
    let url = &archive.url;
    let fail = |message: String| DataError::Download {
        url: url.clone(),
        message,
    };
    let response = ureq::get(url).call().map_err(|e| {
        fail(format!(
            "{e} (check the address and the network, or pass a mirror URL)"
        ))
    })?;
    let total = response
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let bar = match total {
        Some(n) => indicatif::ProgressBar::new(n),
        None => indicatif::ProgressBar::no_length(),
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} {bar:40} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(archive.file_name);
    let mut reader = response.into_body().into_reader();
    let mut out = std::fs::File::create(part).map_err(DataError::io(part))?;
    let mut hasher = Md5::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut got = 0u64;
    loop {
        let n = reader
            .read(&mut buf)
            .map_err(|e| fail(format!("connection broken after {got} bytes: {e}")))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(DataError::io(part))?;
        got += n as u64;
        bar.set_position(got);
    }
    out.sync_all().map_err(DataError::io(part))?;
    bar.finish_and_clear();
    if let Some(n) = total.filter(|&n| n != got) {
        return Err(fail(format!("got {got} of {n} bytes (download cut short)")));
    }
    let actual = hex(&hasher.finalize());
    if actual != archive.md5 {
        return Err(DataError::Checksum {
            path: PathBuf::from(url),
            algorithm: "md5",
            expected: archive.md5.into(),
            actual,
            fix: "nothing was kept; download again, or from another mirror (--url)".into(),
        });
    }
    Ok(())
}

/// Extracts `archive` (`.tar.gz`) into `dir`, so that `dir/folder` appears complete or not at
/// all.
fn extract(archive: &Path, dir: &Path, folder: &str) -> Result<()> {
    let tmp = dir.join(format!(".{folder}.extract{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let result = (|| {
        let file = std::fs::File::open(archive).map_err(DataError::io(archive))?;
        let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(file));
        tar.unpack(&tmp).map_err(|e| {
            DataError::format(archive, format!("cannot extract (corrupt archive?): {e}"))
        })?;
        let inner = tmp.join(folder);
        if !inner.is_dir() {
            return Err(DataError::format(
                archive,
                format!("the archive holds no {folder}/ folder"),
            ));
        }
        std::fs::File::create(inner.join(DONE_MARKER)).map_err(DataError::io(&inner))?;
        let target = dir.join(folder);
        let _ = std::fs::remove_dir_all(&target);
        std::fs::rename(&inner, &target).map_err(DataError::io(&target))
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

//! ImageNet-style image folders: `root/<split>/<class>/<image>`, decoded on demand.

use std::path::{Path, PathBuf};

use burn::data::dataset::{Dataset, DatasetError};

use crate::Split;
use crate::error::{DataError, Result};
use crate::image::{Example, Image, Source};

/// File extensions read as images (case-insensitive).
pub const IMAGE_EXTENSIONS: [&str; 5] = ["jpeg", "jpg", "png", "bmp", "webp"];

/// Whether `path` names an image by its extension (one of [`IMAGE_EXTENSIONS`], any case).
pub fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// The image files (by extension) in `dir` and below it: `dir`'s own in name order, then each
/// sub-folder's the same way, in name order. A folder reached again through a link is read
/// once. A folder that cannot be listed is left out and named in the errors.
pub fn image_files(dir: &Path) -> (Vec<PathBuf>, Vec<DataError>) {
    let mut files = Vec::new();
    let mut errors = Vec::new();
    walk(dir, &mut files, &mut errors, &mut Default::default());
    (files, errors)
}

fn walk(
    dir: &Path,
    files: &mut Vec<PathBuf>,
    errors: &mut Vec<DataError>,
    seen: &mut std::collections::HashSet<PathBuf>,
) {
    if !seen.insert(dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf())) {
        return;
    }
    // The entries' types come from the listing (no file-system call per file, which matters on
    // ImageNet's 1.28 million); only links are followed to see what they name.
    let listed = std::fs::read_dir(dir).and_then(|entries| {
        entries
            .map(|e| {
                let e = e?;
                let path = e.path();
                let kind = e.file_type()?;
                let (is_dir, is_file) = if kind.is_symlink() {
                    (path.is_dir(), path.is_file())
                } else {
                    (kind.is_dir(), kind.is_file())
                };
                Ok((path, is_dir, is_file))
            })
            .collect::<std::io::Result<Vec<_>>>()
    });
    let mut entries = match listed {
        Ok(entries) => entries,
        Err(e) => {
            errors.push(DataError::io(dir)(e));
            return;
        }
    };
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let mut folders = Vec::new();
    for (path, is_dir, is_file) in entries {
        if is_dir {
            folders.push(path);
        } else if is_file && has_image_extension(&path) {
            files.push(path);
        }
    }
    for folder in folders {
        walk(&folder, files, errors, seen);
    }
}

/// An image-folder data set: one sub-folder per class, class index = position of the folder
/// name in sorted order; a class's images are those in its folder and below it. Images are
/// decoded (as RGB) when an example is read.
#[derive(Clone, Debug)]
pub struct ImageFolder {
    root: PathBuf,
    classes: Vec<String>,
    items: Vec<(PathBuf, usize)>,
}

impl ImageFolder {
    /// Scans `root/<split>/` (`train` or `val`). Fails, naming the folder, if it is missing or a
    /// class folder holds no image.
    pub fn open(root: &Path, split: Split) -> Result<Self> {
        let sub = match split {
            Split::Train => "train",
            Split::Test => "val",
        };
        Self::scan(&root.join(sub))
    }

    /// Scans `root/<split>/` with the classes of `reference` (the training split): an image's
    /// label is its class's index there, whatever other class folders this split lacks, so
    /// that the splits agree on what each label means. A class folder `reference` does not
    /// have is an error naming it.
    pub fn open_like(root: &Path, split: Split, reference: &ImageFolder) -> Result<Self> {
        let mut folder = Self::open(root, split)?;
        let index: std::collections::HashMap<&str, usize> = reference
            .classes
            .iter()
            .enumerate()
            .map(|(i, c)| (c.as_str(), i))
            .collect();
        let mut relabel = Vec::with_capacity(folder.classes.len());
        for class in &folder.classes {
            match index.get(class.as_str()) {
                Some(&i) => relabel.push(i),
                None => {
                    return Err(DataError::format(
                        &folder.root.join(class),
                        format!(
                            "class `{class}` has no folder in {} ({} classes there); both splits \
                             must name their classes with the same folders",
                            reference.root.display(),
                            reference.classes.len()
                        ),
                    ));
                }
            }
        }
        for item in &mut folder.items {
            item.1 = relabel[item.1];
        }
        folder.classes = reference.classes.clone();
        Ok(folder)
    }

    /// Scans one folder of class sub-folders.
    pub fn scan(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(DataError::Missing {
                path: dir.to_path_buf(),
                hint: "expected an image folder: root/train/<class>/*.JPEG and root/val/<class>/*.JPEG, one sub-folder per class (ImageNet is never downloaded; prepare it in this layout)".into(),
            });
        }
        let mut classes: Vec<String> = read_dir_sorted(dir)?
            .into_iter()
            .filter(|p| p.is_dir())
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        classes.sort();
        if classes.is_empty() {
            let flat = read_dir_sorted(dir)?
                .iter()
                .any(|p| p.is_file() && has_image_extension(p));
            let hint = if flat {
                "; its images lie directly in it (as in ImageNet's validation archive): move \
                 each into the folder of its class, as the usual valprep.sh script does"
            } else {
                ""
            };
            return Err(DataError::format(
                dir,
                format!("no class sub-folders (expected <class>/<image> under this folder){hint}"),
            ));
        }
        let mut items = Vec::new();
        for (label, class) in classes.iter().enumerate() {
            let class_dir = dir.join(class);
            // As torchvision's ImageFolder: the images below a class folder belong to it too
            // (Tiny ImageNet keeps them in `<class>/images/`).
            let (files, errors) = image_files(&class_dir);
            if let Some(e) = errors.into_iter().next() {
                return Err(e);
            }
            if files.is_empty() {
                return Err(DataError::format(
                    &class_dir,
                    format!(
                        "class folder holds no image, in it or below it (looked for .{})",
                        IMAGE_EXTENSIONS.join(", .")
                    ),
                ));
            }
            items.extend(files.into_iter().map(|f| (f, label)));
        }
        Ok(Self {
            root: dir.to_path_buf(),
            classes,
            items,
        })
    }

    /// The first `per_class` images of every class (in sorted file order): a class-balanced
    /// subset for quick runs.
    pub fn balanced_head(mut self, per_class: usize) -> Self {
        let mut taken = vec![0usize; self.classes.len()];
        self.items.retain(|(_, label)| {
            taken[*label] += 1;
            taken[*label] <= per_class
        });
        self
    }

    /// The scanned folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The image files with their labels.
    pub fn items(&self) -> &[(PathBuf, usize)] {
        &self.items
    }

    /// Writes the class list (one name per line, line number = class index) to `path`,
    /// atomically.
    pub fn write_class_list(&self, path: &Path) -> Result<()> {
        let mut text = self.classes.join("\n");
        text.push('\n');
        Ok(dnal_core::io::write_atomic(path, text.as_bytes())?)
    }
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = std::fs::read_dir(dir)
        .map_err(DataError::io(dir))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(DataError::io(dir))?;
    out.sort();
    Ok(out)
}

/// Decodes an image file as 8-bit RGB.
pub fn decode_rgb(path: &Path) -> Result<Image> {
    let bytes = std::fs::read(path).map_err(DataError::io(path))?;
    decode_rgb_bytes(path, &bytes)
}

/// Decodes the bytes of an image file (JPEG or PNG) as 8-bit RGB; `path` only names the file
/// in errors.
pub fn decode_rgb_bytes(path: &Path, bytes: &[u8]) -> Result<Image> {
    decode_bytes(path, bytes, 3)
}

/// Decodes an image file as 8-bit grey (`channels` 1) or RGB (3).
pub fn decode(path: &Path, channels: usize) -> Result<Image> {
    let bytes = std::fs::read(path).map_err(DataError::io(path))?;
    decode_bytes(path, &bytes, channels)
}

/// Decodes the bytes of an image file as 8-bit grey (`channels` 1) or RGB (3); `path` only
/// names the file in errors.
pub fn decode_bytes(path: &Path, bytes: &[u8], channels: usize) -> Result<Image> {
    // A decoder that panics on a malformed file (zune-jpeg 0.5.15 overflows an i32 on a
    // crafted DC coefficient when overflow checks are on; found by fuzzing) is an error naming
    // the file, not the end of the loader thread.
    let decoded = std::panic::catch_unwind(|| image::load_from_memory(bytes)).map_err(|_| {
        DataError::format(
            path,
            "the image decoder failed on this file (malformed data); re-encode or remove it",
        )
    })?;
    let img = decoded.map_err(|e| DataError::format(path, format!("not a readable image: {e}")))?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    match channels {
        1 => Ok(Image::new(h, w, 1, img.into_luma8().into_raw())),
        3 => Ok(Image::new(h, w, 3, img.into_rgb8().into_raw())),
        c => Err(DataError::format(
            path,
            format!("{c} channels asked for; images decode to 1 (grey) or 3 (RGB)"),
        )),
    }
}

impl Source for ImageFolder {
    fn len(&self) -> usize {
        self.items.len()
    }
    fn example(&self, index: usize) -> Result<Example> {
        let (path, label) = &self.items[index];
        Ok(Example {
            image: decode_rgb(path)?,
            label: *label,
        })
    }
    fn classes(&self) -> &[String] {
        &self.classes
    }
    fn channels(&self) -> usize {
        3
    }
}

impl Dataset<Example> for ImageFolder {
    fn get(&self, index: usize) -> Result<Example, DatasetError> {
        if index >= self.items.len() {
            return Err(DatasetError::new(DataError::invalid(
                "index",
                format!(
                    "{index} is past the end of a data set of {}",
                    self.items.len()
                ),
            )));
        }
        self.example(index).map_err(DatasetError::new)
    }
    fn len(&self) -> usize {
        self.items.len()
    }
}

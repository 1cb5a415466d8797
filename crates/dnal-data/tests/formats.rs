//! Readers of every format, on real data (the bundled MNIST sample) and on small generated files,
//! including every kind of bad input.

mod common;

use std::path::Path;

use common::*;
use dnal_data::{
    CifarKind, DataError, IdxKind, ImageFolder, Source, Split, bundled_mnist, bundled_mnist_from,
    datasets_dir, load_cifar, load_cifar_sized, load_idx,
};

#[test]
fn bundled_mnist_has_a_balanced_4000_1000_split() {
    let train = bundled_mnist(Split::Train).unwrap();
    let test = bundled_mnist(Split::Test).unwrap();
    assert_eq!((train.len(), test.len()), (4000, 1000));
    assert_eq!(train.shape(), [28, 28, 1]);
    assert_eq!(train.class_counts(), vec![400; 10]);
    assert_eq!(test.class_counts(), vec![100; 10]);
    // Real digits: about a fifth of MNIST pixels are ink, and the border is blank.
    let e = train.example(0);
    let ink = e.image.pixels.iter().filter(|&&p| p > 128).count();
    assert!((40..400).contains(&ink), "{ink} ink pixels");
    assert_eq!(e.image.at(0, 0, 0), 0);
    // The two splits are disjoint.
    let first_test = test.example(0).image;
    assert!((0..train.len()).all(|i| train.example(i).image != first_test));
}

#[test]
fn bundled_mnist_checks_its_checksum_and_names_a_missing_file() {
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("mnist_5k.csv.gz");
    let mut bytes =
        std::fs::read(datasets_dir().join(dnal_data::mnist::BUNDLED_MNIST_FILE)).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0xff;
    std::fs::write(&copy, &bytes).unwrap();
    let err = bundled_mnist_from(&copy, Split::Train).unwrap_err();
    assert!(matches!(err, DataError::Checksum { .. }), "{err}");
    assert!(err.to_string().contains("mnist_5k.csv.gz"), "{err}");

    let err = bundled_mnist_from(&tmp.path().join("nope.csv.gz"), Split::Train).unwrap_err();
    assert!(matches!(err, DataError::Missing { .. }), "{err}");
    assert!(err.to_string().contains("DNAL_DATASETS"), "{err}");

    // A folder without the sample names the file it looked for.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let err = bundled_mnist_from(&empty, Split::Train).unwrap_err();
    assert!(matches!(err, DataError::Missing { .. }), "{err}");
    assert!(
        err.to_string().contains("mnist-5k/mnist_5k.csv.gz"),
        "{err}"
    );
}

#[test]
fn bundled_mnist_is_found_from_its_folder_or_the_datasets_folder() {
    let file = bundled_mnist_from(
        &datasets_dir().join(dnal_data::mnist::BUNDLED_MNIST_FILE),
        Split::Test,
    )
    .unwrap();
    for place in [datasets_dir().join("mnist-5k"), datasets_dir()] {
        let set = bundled_mnist_from(&place, Split::Test).unwrap();
        assert_eq!(set.len(), file.len(), "{}", place.display());
        assert_eq!(set.example(7).image, file.example(7).image);
    }
}

#[test]
fn mnist_csv_rows_are_validated() {
    let p = Path::new("rows.csv");
    let row = |label: &str| format!("{}{label}\n", "0,".repeat(784));
    assert_eq!(
        dnal_data::mnist::parse_mnist_csv(p, row("7").as_bytes())
            .unwrap()
            .len(),
        1
    );
    let err = dnal_data::mnist::parse_mnist_csv(p, row("12").as_bytes()).unwrap_err();
    assert!(err.to_string().contains("label 12"), "{err}");
    let err = dnal_data::mnist::parse_mnist_csv(p, b"1,2,3\n").unwrap_err();
    assert!(err.to_string().contains("3 values, expected 785"), "{err}");
}

#[test]
fn cifar10_folder_and_archive_give_the_same_images() {
    let tmp = tempfile::tempdir().unwrap();
    write_cifar10_dir(tmp.path(), 20);
    let from_dir = load_cifar_sized(CifarKind::Cifar10, tmp.path(), Split::Train, 20).unwrap();
    assert_eq!(from_dir.len(), 100);
    assert_eq!(from_dir.classes()[9], "truck");
    // Record 3 of each file: label 3, channel c filled with 3 * 7 + c, stored planar on disk and
    // interleaved in memory.
    let e = from_dir.example(3);
    assert_eq!(e.label, 3);
    assert_eq!(
        (
            e.image.at(0, 0, 0),
            e.image.at(31, 31, 1),
            e.image.at(5, 9, 2)
        ),
        (21, 22, 23)
    );

    let archive = tmp.path().join("cifar-10-binary.tar.gz");
    std::fs::write(&archive, cifar10_targz(20)).unwrap();
    let from_tar = load_cifar_sized(CifarKind::Cifar10, &archive, Split::Train, 20).unwrap();
    assert_eq!(from_tar.len(), 100);
    assert!((0..100).all(|i| from_tar.example(i) == from_dir.example(i)));
    let test = load_cifar_sized(CifarKind::Cifar10, &archive, Split::Test, 20).unwrap();
    assert_eq!(test.len(), 20);
}

#[test]
fn cifar100_reads_fine_and_coarse_labels() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cifar-100-binary");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("train.bin"),
        cifar_records(CifarKind::Cifar100, 150),
    )
    .unwrap();
    let fine = load_cifar_sized(CifarKind::Cifar100, tmp.path(), Split::Train, 150).unwrap();
    let coarse =
        load_cifar_sized(CifarKind::Cifar100Coarse, tmp.path(), Split::Train, 150).unwrap();
    assert_eq!(fine.example(123).label, 23);
    assert_eq!(coarse.example(123).label, 3);
    assert_eq!((fine.classes().len(), coarse.classes().len()), (100, 20));
}

#[test]
fn cifar_bad_files_are_reported_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    write_cifar10_dir(root, 20);
    let dir = root.join("cifar-10-batches-bin");

    // The official loader wants 10,000 records per file.
    let err = load_cifar(CifarKind::Cifar10, root, Split::Test).unwrap_err();
    assert!(
        err.to_string().contains("test_batch.bin") && err.to_string().contains("wrong file size"),
        "{err}"
    );

    // Truncated record.
    let mut bytes = cifar_records(CifarKind::Cifar10, 20);
    bytes.truncate(bytes.len() - 100);
    std::fs::write(dir.join("data_batch_3.bin"), &bytes).unwrap();
    let err = load_cifar_sized(CifarKind::Cifar10, root, Split::Train, 20).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("data_batch_3.bin") && msg.contains("middle of a record"),
        "{msg}"
    );

    // Label out of range.
    let mut bytes = cifar_records(CifarKind::Cifar10, 20);
    bytes[5 * 3073] = 10;
    std::fs::write(dir.join("data_batch_3.bin"), &bytes).unwrap();
    let msg = load_cifar_sized(CifarKind::Cifar10, root, Split::Train, 20)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("data_batch_3.bin") && msg.contains("record 5: label 10"),
        "{msg}"
    );

    // Missing file.
    std::fs::write(
        dir.join("data_batch_3.bin"),
        cifar_records(CifarKind::Cifar10, 20),
    )
    .unwrap();
    std::fs::remove_file(dir.join("data_batch_5.bin")).unwrap();
    let msg = load_cifar_sized(CifarKind::Cifar10, root, Split::Train, 20)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("data_batch_5.bin"), "{msg}");

    // Missing folder: says how to download.
    let msg = load_cifar(CifarKind::Cifar10, &root.join("none"), Split::Train)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("cargo xtask data download cifar10"), "{msg}");

    // Corrupt gzip and cut-short archive.
    let good = cifar10_targz(20);
    let archive = root.join("bad.tar.gz");
    let mut corrupt = good.clone();
    for b in &mut corrupt[100..200] {
        *b ^= 0x5a;
    }
    std::fs::write(&archive, &corrupt).unwrap();
    let msg = load_cifar_sized(CifarKind::Cifar10, &archive, Split::Train, 20)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("bad.tar.gz") && msg.contains("corrupt"),
        "{msg}"
    );
    std::fs::write(&archive, &good[..good.len() / 2]).unwrap();
    let msg = load_cifar_sized(CifarKind::Cifar10, &archive, Split::Train, 20)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("bad.tar.gz"), "{msg}");
}

#[test]
fn idx_files_raw_and_gzipped() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pixels: Vec<u8> = (0..3 * 4 * 5).map(|i| i as u8).collect();
    std::fs::write(dir.join("t10k-images-idx3-ubyte"), idx(&[3, 4, 5], &pixels)).unwrap();
    std::fs::write(
        dir.join("t10k-labels-idx1-ubyte.gz"),
        gzip(&idx(&[3], &[1, 2, 9])),
    )
    .unwrap();
    let set = load_idx(IdxKind::FashionMnist, dir, Split::Test).unwrap();
    assert_eq!(set.len(), 3);
    assert_eq!(set.shape(), [4, 5, 1]);
    assert_eq!(set.example(2).label, 9);
    assert_eq!(set.example(1).image.at(3, 4, 0), 39);
    assert_eq!(set.classes()[9], "Ankle boot");

    // Truncated image file.
    std::fs::write(
        dir.join("t10k-images-idx3-ubyte"),
        idx(&[3, 4, 5], &pixels[..50]),
    )
    .unwrap();
    let msg = load_idx(IdxKind::Mnist, dir, Split::Test)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("t10k-images-idx3-ubyte") && msg.contains("truncated"),
        "{msg}"
    );
    // Wrong magic (a label file where images belong).
    std::fs::write(dir.join("t10k-images-idx3-ubyte"), idx(&[3], &[1, 2, 3])).unwrap();
    let msg = load_idx(IdxKind::Mnist, dir, Split::Test)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("bad IDX magic"), "{msg}");
    // Label out of range.
    std::fs::write(dir.join("t10k-images-idx3-ubyte"), idx(&[3, 4, 5], &pixels)).unwrap();
    std::fs::write(
        dir.join("t10k-labels-idx1-ubyte.gz"),
        gzip(&idx(&[3], &[1, 12, 9])),
    )
    .unwrap();
    let msg = load_idx(IdxKind::Mnist, dir, Split::Test)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("label 12"), "{msg}");
    // Corrupt gzip.
    std::fs::write(
        dir.join("t10k-labels-idx1-ubyte.gz"),
        [0x1f, 0x8b, 8, 0, 1, 2, 3],
    )
    .unwrap();
    let msg = load_idx(IdxKind::Mnist, dir, Split::Test)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("t10k-labels-idx1-ubyte.gz") && msg.contains("gzip"),
        "{msg}"
    );
    // Missing.
    let msg = load_idx(IdxKind::Mnist, dir, Split::Train)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("train-images-idx3-ubyte"), "{msg}");
}

#[test]
fn image_folders_sort_classes_and_report_bad_images() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    for (class, n) in [("zebra", 2), ("ant", 3)] {
        let dir = root.join("train").join(class);
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..n {
            let ext = if i % 2 == 0 { "JPEG" } else { "png" };
            write_image(&dir.join(format!("{i}.{ext}")), 50 + i, 40);
        }
    }
    let folder = ImageFolder::open(root, Split::Train).unwrap();
    assert_eq!(folder.classes(), ["ant", "zebra"]);
    assert_eq!(folder.len(), 5);
    let e = folder.example(4).unwrap();
    assert_eq!(
        (e.label, e.image.width, e.image.height, e.image.channels),
        (1, 51, 40, 3)
    );
    assert_eq!(e.image.at(10, 20, 0), 20); // PNG is lossless
    let head = folder.clone().balanced_head(1);
    assert_eq!(
        head.items().iter().map(|(_, l)| *l).collect::<Vec<_>>(),
        [0, 1]
    );
    folder.write_class_list(&root.join("classes.txt")).unwrap();
    assert_eq!(
        std::fs::read_to_string(root.join("classes.txt")).unwrap(),
        "ant\nzebra\n"
    );

    // A corrupt JPEG is an error naming the file when it is read.
    std::fs::write(
        root.join("train/ant/0.JPEG"),
        b"\xff\xd8\xff\xe0 not really a jpeg",
    )
    .unwrap();
    let folder = ImageFolder::open(root, Split::Train).unwrap();
    let msg = folder.example(0).unwrap_err().to_string();
    assert!(
        msg.contains("0.JPEG") && msg.contains("not a readable image"),
        "{msg}"
    );

    // Images below a class folder belong to its class, as in torchvision's ImageFolder (Tiny
    // ImageNet's `train/<class>/images/`); other files and a link back up are passed over.
    let nested = root.join("train/zebra/images/more");
    std::fs::create_dir_all(&nested).unwrap();
    write_image(&root.join("train/zebra/images/5.png"), 30, 30);
    write_image(&nested.join("6.png"), 31, 30);
    std::fs::write(nested.join("notes.txt"), "not an image").unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink(root.join("train/zebra"), nested.join("up")).unwrap();
    let folder = ImageFolder::open(root, Split::Train).unwrap();
    let zebra: Vec<String> = folder
        .items()
        .iter()
        .filter(|(_, label)| *label == 1)
        .map(|(p, _)| p.strip_prefix(root).unwrap().display().to_string())
        .collect();
    assert_eq!(
        zebra,
        [
            "train/zebra/0.JPEG",
            "train/zebra/1.png",
            "train/zebra/images/5.png",
            "train/zebra/images/more/6.png"
        ]
    );
    assert_eq!(folder.classes(), ["ant", "zebra"]);

    // An empty class folder, and a missing split folder.
    std::fs::create_dir_all(root.join("train/empty/sub")).unwrap();
    let msg = ImageFolder::open(root, Split::Train)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("empty") && msg.contains("no image"), "{msg}");
    let msg = ImageFolder::open(root, Split::Test)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("val") && msg.contains("root/train/<class>"),
        "{msg}"
    );
    // A validation folder of images without class folders, as ImageNet's archive unpacks.
    std::fs::create_dir_all(root.join("val")).unwrap();
    write_image(&root.join("val/ILSVRC2012_val_00000001.JPEG"), 30, 30);
    let msg = ImageFolder::open(root, Split::Test)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("no class sub-folders") && msg.contains("valprep"),
        "{msg}"
    );
}

/// A validation split without one of the training classes keeps the training split's labels
/// (a folder-by-folder numbering would shift every class after the gap); a class only the
/// validation split has is an error naming it.
#[test]
fn a_validation_split_takes_the_training_classes_labels() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    for (split, classes) in [("train", ["ant", "bee", "cat"]), ("val", ["cat", "", ""])] {
        for class in classes.into_iter().filter(|c| !c.is_empty()) {
            let dir = root.join(split).join(class);
            std::fs::create_dir_all(&dir).unwrap();
            write_image(&dir.join("0.png"), 20, 20);
        }
    }
    let train = ImageFolder::open(root, Split::Train).unwrap();
    assert_eq!(
        ImageFolder::open(root, Split::Test)
            .unwrap()
            .example(0)
            .unwrap()
            .label,
        0
    );
    let val = ImageFolder::open_like(root, Split::Test, &train).unwrap();
    assert_eq!(val.classes(), ["ant", "bee", "cat"]);
    assert_eq!(val.len(), 1);
    assert_eq!(val.example(0).unwrap().label, 2);

    let dir = root.join("val/dog");
    std::fs::create_dir_all(&dir).unwrap();
    write_image(&dir.join("0.png"), 20, 20);
    let msg = ImageFolder::open_like(root, Split::Test, &train)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("val/dog") && msg.contains("class `dog` has no folder in"),
        "{msg}"
    );
}

/// Inputs the fuzz targets found (`fuzz/README.md`), replayed: each gives an image or an error,
/// never a panic.
#[test]
fn fuzz_findings_are_errors_not_panics() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/fuzz");
    // A JPEG whose DC coefficient times its quantiser overflows i32 inside zune-jpeg.
    let path = dir.join("image-dc-overflow.jpg");
    let bytes = std::fs::read(&path).unwrap();
    match dnal_data::folder::decode_rgb_bytes(&path, &bytes) {
        Ok(img) => assert_eq!(img.pixels.len(), img.height * img.width * 3),
        Err(e) => assert!(e.to_string().contains("image-dc-overflow.jpg"), "{e}"),
    }
}

//! Augmentation and batching: determinism, coverage, normalisation, and burn's data loader.

mod common;

use std::sync::Arc;

use burn::data::dataloader::DataLoaderBuilder;
use dnal_data::{
    AugmentedDataset, Image, ImageBatcher, ImageSet, Loader, LoaderConfig, Normalize, Source,
    Transform, example_rng,
};

fn numbered_set(n: usize) -> ImageSet {
    // Image i: every pixel of channel c is (i + 10 c) % 256, label i % 10.
    let mut pixels = Vec::new();
    for i in 0..n {
        for _ in 0..32 * 32 {
            pixels.extend((0..3).map(|c| ((i + 10 * c) % 256) as u8));
        }
    }
    let labels = (0..n).map(|i| (i % 10) as u16).collect();
    ImageSet::new(
        [32, 32, 3],
        pixels,
        labels,
        dnal_data::image::numbered_classes(10),
    )
    .unwrap()
}

fn ramp(h: usize, w: usize) -> Image {
    let pixels = (0..h * w)
        .flat_map(|p| [(p % 251) as u8, (p / 7 % 256) as u8, 3])
        .collect();
    Image::new(h, w, 3, pixels)
}

#[test]
fn augmentation_depends_only_on_seed_epoch_and_index() {
    let img = ramp(32, 32);
    let t = Transform::cifar_train();
    let a = t.apply(img.clone(), &mut example_rng(1, 2, 3));
    let b = t.apply(img.clone(), &mut example_rng(1, 2, 3));
    assert_eq!(a, b);
    let others: Vec<Image> = (0..8)
        .map(|e| t.apply(img.clone(), &mut example_rng(1, e + 3, 3)))
        .collect();
    assert!(
        others.iter().any(|o| *o != a),
        "eight epochs all gave the same crop"
    );
    // Pad-crop-flip keeps the size and moves pixels, it never invents values (except the zero padding).
    assert_eq!((a.height, a.width), (32, 32));
    assert!(a.pixels.iter().all(|&v| v == 0 || img.pixels.contains(&v)));
}

#[test]
fn pad_crop_flip_covers_every_shift_and_both_flips() {
    let mut img = Image::new(32, 32, 1, vec![0; 1024]);
    img.pixels[0] = 255; // a marker at the top-left corner
    let t = Transform::PadCropFlip { pad: 4 };
    let mut seen = std::collections::HashSet::new();
    for i in 0..2000 {
        let out = t.apply(img.clone(), &mut example_rng(7, 0, i));
        if let Some(p) = out.pixels.iter().position(|&v| v == 255) {
            seen.insert((p / 32, p % 32));
        }
    }
    // The marker lands at rows 0..=4 and columns 0..=4 (unflipped) or 27..=31 (flipped).
    assert!(
        seen.iter().all(|&(y, x)| y <= 4 && (x <= 4 || x >= 27)),
        "{seen:?}"
    );
    assert_eq!(seen.len(), 50, "{seen:?}");
}

#[test]
fn imagenet_transforms_produce_224_crops() {
    let img = ramp(375, 500);
    let train = Transform::imagenet_train((0.08, 1.0));
    for i in 0..20 {
        let out = train.apply(img.clone(), &mut example_rng(0, 0, i));
        assert_eq!((out.height, out.width, out.channels), (224, 224, 3));
    }
    let test = Transform::imagenet_test().apply(img.clone(), &mut example_rng(0, 0, 0));
    assert_eq!((test.height, test.width), (224, 224));
    // The centre crop of a horizontal ramp is centred: its middle column comes from the middle.
    let mid = test.at(112, 112, 0) as i32;
    let src_mid = img.at(187, 250, 0) as i32;
    assert!((mid - src_mid).abs() <= 3, "{mid} vs {src_mid}");
    assert!(
        Transform::RandomResizedCrop {
            size: 224,
            scale: (0.5, 0.2)
        }
        .validate()
        .is_err()
    );
    assert!(
        Transform::ResizeCenterCrop {
            resize: 200,
            crop: 224
        }
        .validate()
        .is_err()
    );
}

#[test]
fn loader_is_deterministic_and_covers_each_example_once() {
    let set = Arc::new(numbered_set(50));
    let cfg = LoaderConfig::train(8, 42);
    let loader = Loader::new(
        set.clone(),
        Transform::cifar_train(),
        Normalize::cifar10(),
        cfg,
    )
    .unwrap();
    assert_eq!(loader.len(), 6);
    let run = |epoch| loader.epoch(epoch).collect::<Result<Vec<_>, _>>().unwrap();
    let (a, b, c) = (run(3), run(3), run(4));
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert_eq!(a.len(), 6);
    assert!(a.iter().all(|batch| batch.shape == [8, 3, 32, 32]));
    let order = loader.order(3);
    let mut seen = order[..48].to_vec();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 48);
    let labels: Vec<i64> = a.iter().flat_map(|b| b.labels.clone()).collect();
    assert_eq!(
        labels,
        order[..48]
            .iter()
            .map(|&i| (i % 10) as i64)
            .collect::<Vec<_>>()
    );

    // Evaluation: file order, no augmentation, the last partial batch kept, exact normalisation.
    let eval = Loader::new(
        set,
        Transform::Identity,
        Normalize::cifar10(),
        LoaderConfig::eval(16),
    )
    .unwrap();
    let batches: Vec<_> = eval.epoch(0).collect::<Result<_, _>>().unwrap();
    assert_eq!(
        batches.iter().map(|b| b.len()).collect::<Vec<_>>(),
        vec![16, 16, 16, 2]
    );
    let norm = Normalize::cifar10();
    // Image 17, channel 1, any pixel: (17 + 10) / 255.
    let v = batches[1].images[3072 + 1024 + 500]; // image 1 of the batch, channel 1
    let want = ((27.0 / 255.0) - norm.mean[1]) / norm.std[1];
    assert!((v - want).abs() < 1e-6, "{v} vs {want}");
}

#[test]
fn loader_rejects_bad_settings() {
    let set: Arc<dyn Source> = Arc::new(numbered_set(4));
    let bad = |t, n: Normalize, b| {
        Loader::new(set.clone(), t, n, LoaderConfig::train(b, 0))
            .err()
            .unwrap()
            .to_string()
    };
    assert!(bad(Transform::Identity, Normalize::cifar10(), 0).contains("batch_size"));
    assert!(bad(Transform::Identity, Normalize::mnist(), 2).contains("channel"));
}

#[test]
fn burn_data_loader_with_workers_gives_the_loader_images() {
    let set = numbered_set(24);
    let ds = AugmentedDataset::new(set.clone(), Transform::cifar_train(), 5).unwrap();
    ds.set_epoch(2);
    let device = burn::tensor::Device::default();
    let dl = DataLoaderBuilder::new(ImageBatcher::new(Normalize::cifar10()))
        .batch_size(6)
        .num_workers(2)
        .set_device(device.clone())
        .build(ds);
    let mut total = 0;
    let mut sum = 0.0f64;
    for batch in dl.iter() {
        let batch = batch.unwrap();
        assert_eq!(batch.images.dims(), [6, 3, 32, 32]);
        total += 6;
        sum += batch.images.sum().into_scalar::<f32>() as f64;
    }
    assert_eq!(total, 24);
    // The same images as our own loader in file order with the same seed and epoch.
    let cfg = dnal_data::LoaderConfig {
        shuffle: false,
        ..LoaderConfig::train(24, 5)
    };
    let ours = Loader::new(
        Arc::new(set),
        Transform::cifar_train(),
        Normalize::cifar10(),
        cfg,
    )
    .unwrap();
    let all = ours.epoch(2).next().unwrap().unwrap();
    let ours_sum: f64 = all.images.iter().map(|&v| v as f64).sum();
    assert!(
        (sum - ours_sum).abs() < 1e-2 * ours_sum.abs().max(1.0),
        "{sum} vs {ours_sum}"
    );
}

#[test]
fn a_batch_splits_into_ordered_shares_of_near_equal_size() {
    let per = 2 * 3 * 3;
    let batch = dnal_data::HostBatch {
        images: (0..7 * per).map(|v| v as f32).collect(),
        shape: [7, 2, 3, 3],
        labels: (0..7).collect(),
    };
    let shares = batch.split(3);
    let sizes: Vec<usize> = shares.iter().map(|s| s.len()).collect();
    assert_eq!(sizes, [3, 2, 2]);
    for s in &shares {
        assert_eq!(s.shape, [s.len(), 2, 3, 3]);
        assert_eq!(s.images.len(), s.len() * per);
    }
    // Concatenated in order, the shares are the batch.
    let images: Vec<f32> = shares.iter().flat_map(|s| s.images.clone()).collect();
    let labels: Vec<i64> = shares.iter().flat_map(|s| s.labels.clone()).collect();
    assert_eq!(
        (images, labels),
        (batch.images.clone(), batch.labels.clone())
    );
    // More parts than images: the last shares are empty.
    let sizes: Vec<usize> = batch.split(9).iter().map(|s| s.len()).collect();
    assert_eq!(sizes, [1, 1, 1, 1, 1, 1, 1, 0, 0]);
    assert_eq!(batch.split(1)[0], batch);
}

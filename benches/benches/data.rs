//! The data pipeline: augmented CIFAR batches (pad-crop-flip + normalise) of 128, and ImageNet
//! batches of 8 (read, JPEG decode, RandomResizedCrop(224), flip, normalise) of photo-like
//! 500x375 JPEGs (`dnal_benches::photo_jpegs`), on 1 and 2 threads. Throughput is reported in
//! images per second; `benches/reference/pillow_loader.py` times Pillow's loader on the same
//! files. Last, a batch's trip to the device (flex): an ImageNet batch of 64 (224x224) sent
//! with `HostBatch::to_device` (the host batch kept, so its images copied first) and with
//! `HostBatch::into_device` (its buffers handed over).

use std::sync::Arc;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use dnal_data::{
    HostBatch, ImageFolder, ImageSet, Loader, LoaderConfig, Normalize, Source, Split, Transform,
};

dnal_kernels::global_allocator!();

fn cifar_like(n: usize) -> ImageSet {
    let pixels: Vec<u8> = (0..n * 3072).map(|i| (i * 31 % 251) as u8).collect();
    let labels = (0..n).map(|i| (i % 10) as u16).collect();
    ImageSet::new(
        [32, 32, 3],
        pixels,
        labels,
        dnal_data::image::numbered_classes(10),
    )
    .unwrap()
}

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
}

fn cifar(c: &mut Criterion) {
    dnal_benches::set_up_as_the_trainer();
    let set: Arc<dyn Source> = Arc::new(cifar_like(1024));
    let loader = Loader::new(
        set,
        Transform::cifar_train(),
        Normalize::cifar10(),
        LoaderConfig::train(128, 1),
    )
    .unwrap();
    let order = loader.order(0);
    let mut group = c.benchmark_group("data/cifar-augmented-batch-128");
    group.throughput(Throughput::Elements(128));
    for threads in [1, 2] {
        let p = pool(threads);
        group.bench_function(format!("{threads}-thread"), |b| {
            let mut epoch = 0;
            b.iter(|| {
                epoch += 1;
                p.install(|| loader.load(epoch, &order[..128]).unwrap())
            })
        });
    }
    group.finish();
}

fn imagenet(c: &mut Criterion) {
    dnal_benches::set_up_as_the_trainer();
    let dir = tempfile::tempdir().unwrap();
    let class = dir.path().join("train").join("n01440764");
    std::fs::create_dir_all(&class).unwrap();
    dnal_benches::photo_jpegs(&class, 8, 1);
    let folder = ImageFolder::open(dir.path(), Split::Train).unwrap();
    let loader = Loader::new(
        Arc::new(folder),
        Transform::imagenet_train((0.08, 1.0)),
        Normalize::imagenet(),
        LoaderConfig::train(8, 1),
    )
    .unwrap();
    let idx: Vec<usize> = (0..8).collect();
    let mut group = c.benchmark_group("data/imagenet-photo-jpeg-rrc224-batch-8");
    group.throughput(Throughput::Elements(8));
    group.sample_size(20);
    for threads in [1, 2] {
        let p = pool(threads);
        group.bench_function(format!("{threads}-thread"), |b| {
            let mut epoch = 0;
            b.iter(|| {
                epoch += 1;
                p.install(|| loader.load(epoch, &idx).unwrap())
            })
        });
    }
    group.finish();
}

fn to_device(c: &mut Criterion) {
    dnal_benches::set_up_as_the_trainer();
    let device = burn::tensor::Device::flex();
    let shape = [64, 3, 224, 224];
    let batch = HostBatch {
        images: (0..shape.iter().product::<usize>())
            .map(|i| (i % 255) as f32 / 255.0)
            .collect(),
        shape,
        labels: (0..64).map(|i| i % 1000).collect(),
    };
    let mut group = c.benchmark_group("data/imagenet-batch-64-to-device");
    group.throughput(Throughput::Elements(64));
    group.bench_function("to_device", |b| {
        b.iter(|| batch.to_device(&device));
    });
    group.bench_function("into_device", |b| {
        b.iter_batched(
            || batch.clone(),
            |batch| batch.into_device(&device),
            BatchSize::PerIteration,
        );
    });
    group.finish();
}

criterion_group!(benches, cifar, imagenet, to_device);
criterion_main!(benches);

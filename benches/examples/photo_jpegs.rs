//! Writes the data bench's eight photo-like JPEGs into a folder (for
//! `benches/reference/pillow_loader.py`) and prints the time per image of each step of dnal's
//! ImageNet training pipeline on them, on this thread: decode, RandomResizedCrop(224) + flip,
//! normalise.
//!
//! `cargo run --release -p dnal-benches --example photo_jpegs -- /tmp/photo-jpegs`

use std::time::Instant;

use dnal_data::{Normalize, Transform, example_rng, folder::decode_rgb};

dnal_kernels::global_allocator!();

fn main() {
    dnal_benches::set_up_as_the_trainer();
    let Some(dir) = std::env::args().nth(1).map(std::path::PathBuf::from) else {
        eprintln!("usage: photo_jpegs FOLDER");
        std::process::exit(2);
    };
    std::fs::create_dir_all(&dir).expect("a writable folder");
    let paths = dnal_benches::photo_jpegs(&dir, 8, 1);
    let sizes: Vec<u64> = paths
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len() / 1000)
        .collect();
    println!(
        "wrote {} JPEGs of 500x375 to {} ({sizes:?} KB)",
        paths.len(),
        dir.display()
    );
    let reps = 50;
    let per_image = |t: Instant| t.elapsed().as_secs_f64() * 1e3 / (reps * paths.len()) as f64;

    let t = Instant::now();
    let mut images = Vec::new();
    for _ in 0..reps {
        images = paths.iter().map(|p| decode_rgb(p).unwrap()).collect();
    }
    let decode = per_image(t);
    let transform = Transform::imagenet_train((0.08, 1.0));
    let t = Instant::now();
    let mut crops = Vec::new();
    for r in 0..reps {
        crops = images
            .iter()
            .enumerate()
            .map(|(i, img)| transform.apply(img.clone(), &mut example_rng(0, r as u64, i as u64)))
            .collect();
    }
    let crop = per_image(t);
    let normalize = Normalize::imagenet();
    let mut out = vec![0f32; 3 * 224 * 224];
    let t = Instant::now();
    for _ in 0..reps {
        for c in &crops {
            normalize.write_planar(c, &mut out);
        }
    }
    let norm = per_image(t);
    println!(
        "per image: read + decode {decode:.3} ms, RandomResizedCrop(224) + flip {crop:.3} ms, \
         normalise {norm:.3} ms; {:.0} images/s on one thread",
        1e3 / (decode + crop + norm)
    );
}

//! The `dnal-train` binary: listing, dry runs, and errors with a non-zero exit status.

use std::process::Command;

fn dnal_train(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dnal-train"))
        .args(args)
        .output()
        .expect("the binary runs");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn list_shows_every_table_row() {
    let (ok, text) = dnal_train(&["train", "--list"]);
    assert!(ok, "{text}");
    for row in [
        "mnist-demo",
        "vgg16-cifar10-l5e-4",
        "resnet56-cifar10-l1e-4",
        "resnet56-cifar10-baseline",
    ] {
        assert!(text.contains(row), "{row} missing from:\n{text}");
    }
    assert!(text.contains("paper: 93.20 %, 36.94M, 0.25M"), "{text}");
}

#[test]
fn dry_run_prints_the_config_and_the_network() {
    let (ok, text) = dnal_train(&["train", "--preset", "resnet56-cifar10-l1e-4", "--dry-run"]);
    assert!(ok, "{text}");
    assert!(text.contains("lambda = 0.0001"), "{text}");
    assert!(
        text.contains("55 gated layers") && text.contains("125485"),
        "{text}"
    );
}

#[test]
fn errors_exit_non_zero_with_a_message() {
    let (ok, text) = dnal_train(&["train", "--preset", "nope"]);
    assert!(!ok && text.contains("unknown preset `nope`"), "{text}");
    let (ok, text) = dnal_train(&["train", "--backend", "cuda"]);
    assert!(!ok && text.contains("--features cuda"), "{text}");
    let (ok, text) = dnal_train(&["train", "--set", "arch.threshold=2"]);
    assert!(!ok && text.contains("arch.threshold"), "{text}");
    let tmp = tempfile::tempdir().unwrap();
    let (ok, text) = dnal_train(&["train", "--resume", tmp.path().to_str().unwrap()]);
    assert!(!ok && text.contains("no checkpoint"), "{text}");
    let (ok, text) = dnal_train(&["download", "imagenet"]);
    assert!(!ok && text.contains("cifar10 and cifar100"), "{text}");
}

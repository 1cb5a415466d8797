//! Weights from torchvision-layout checkpoints: the fixtures (written by
//! `tools/make_torchvision_fixtures.py` with PyTorch) load into dnal's networks through the
//! torchvision key maps, and the networks then give PyTorch's logits.

use std::path::{Path, PathBuf};

use burn::prelude::*;
use dnal_zoo::{
    BottleneckResNetConfig, KeyMap, KeyRules, MobileNetV2Config, Network, PlainCnnConfig,
    load_pretrained,
};

const SIDE: usize = 32;
const BATCH: usize = 2;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/torchvision")
        .join(name)
}

/// The fixtures' input: x[k] = ((k * 7919) mod 1999) / 999.5 - 1, as the script computes it.
fn input(device: &Device) -> Tensor<4> {
    let n = BATCH * 3 * SIDE * SIDE;
    let x: Vec<f32> = (0..n)
        .map(|k| (((k as f64) * 7919.0) % 1999.0 / 999.5 - 1.0) as f32)
        .collect();
    Tensor::<1>::from_floats(x.as_slice(), device).reshape([BATCH, 3, SIDE, SIDE])
}

fn expected(name: &str) -> Vec<f32> {
    let text = std::fs::read_to_string(fixture("expected.json")).unwrap();
    let all: serde_json::Value = serde_json::from_str(&text).unwrap();
    all[name]["logits"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|row| row.as_array().unwrap().iter())
        .map(|v| v.as_f64().unwrap() as f32)
        .collect()
}

fn vgg() -> PlainCnnConfig {
    PlainCnnConfig::new(
        3,
        SIDE,
        vec![4, 4, 8, 8, 8, 8, 8, 16, 16, 16, 16, 16, 16],
        vec![1, 3, 6, 9, 12],
    )
    .with_hidden(vec![12, 12])
    .with_hidden_bn(false)
}

fn resnet() -> BottleneckResNetConfig {
    let mut cfg = BottleneckResNetConfig::with_planes(vec![2, 1, 2, 1], [2, 4, 8, 16], 10).unwrap();
    cfg.image_size = SIDE;
    cfg
}

fn mobilenet() -> MobileNetV2Config {
    MobileNetV2Config::imagenet_widths(
        10,
        SIDE,
        16,
        &[[1, 8, 1, 1], [6, 8, 2, 2], [6, 16, 1, 1], [6, 16, 1, 2]],
        24,
    )
}

/// Loads `file` with `keys` into a freshly built network and compares its eval-mode logits
/// with PyTorch's.
fn matches_pytorch<N: Network>(cfg: &N::Config, file: &str, keys: &KeyMap) {
    let device = Device::default();
    let model = N::build(cfg, &device).unwrap();
    let (model, loaded) = load_pretrained(model, &fixture(file), keys, &[]).unwrap();
    assert!(loaded.applied > 0 && loaded.excluded.is_empty(), "{loaded}");
    assert!(
        loaded
            .ignored
            .iter()
            .all(|k| k.ends_with("num_batches_tracked")),
        "{:?}",
        loaded.ignored
    );
    let logits: Vec<f32> = Network::forward(&model, input(&device))
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();
    let want = expected(file);
    assert_eq!(logits.len(), want.len());
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = logits
        .iter()
        .zip(&want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        worst <= 1e-4 * scale.max(1.0),
        "{file}: logits differ by {worst} (scale {scale}): {logits:?} vs {want:?}"
    );
}

fn model_key() -> KeyMap {
    // torchvision's reference scripts save {"model": state_dict, ...}: a mapping file that
    // names the entry and keeps the family's torchvision names.
    let text = "top_level_key = \"model\"\nbase = \"torchvision\"\n";
    KeyMap::Rules(toml::from_str::<KeyRules>(text).unwrap())
}

#[test]
fn vgg16_bn_from_a_pth_gives_pytorchs_logits() {
    matches_pytorch::<dnal_zoo::PlainCnn>(&vgg(), "vgg16_bn.pth", &KeyMap::Torchvision);
}

#[test]
fn resnet50_from_a_training_checkpoint_gives_pytorchs_logits() {
    matches_pytorch::<dnal_zoo::BottleneckResNet>(&resnet(), "resnet50.pth", &model_key());
}

#[test]
fn mobilenet_v2_from_safetensors_gives_pytorchs_logits() {
    matches_pytorch::<dnal_zoo::MobileNetV2>(
        &mobilenet(),
        "mobilenet_v2.safetensors",
        &KeyMap::Torchvision,
    );
}

fn load_err<N: Network>(cfg: &N::Config, path: &Path, keys: &KeyMap, exclude: &[String]) -> String {
    let model = N::build(cfg, &Device::default()).unwrap();
    match load_pretrained(model, path, keys, exclude) {
        Ok((_, loaded)) => panic!("{} loaded: {loaded}", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_checkpoint_of_other_widths_is_refused_with_the_tensors_named() {
    let mut cfg = vgg();
    cfg.widths[0] = 5;
    let e =
        load_err::<dnal_zoo::PlainCnn>(&cfg, &fixture("vgg16_bn.pth"), &KeyMap::Torchvision, &[]);
    assert!(
        e.contains("convs.0.conv.weight (from `features.0.weight`)"),
        "{e}"
    );
    assert!(
        e.contains("[5, 3, 3, 3]") && e.contains("[4, 3, 3, 3]"),
        "{e}"
    );
}

#[test]
fn other_classes_need_the_classifier_excluded() {
    let cfg = vgg().with_num_classes(7);
    let e =
        load_err::<dnal_zoo::PlainCnn>(&cfg, &fixture("vgg16_bn.pth"), &KeyMap::Torchvision, &[]);
    assert!(e.contains("classifier.weight"), "{e}");
    let device = Device::default();
    let fresh = dnal_zoo::PlainCnn::build(&cfg, &device).unwrap();
    let classifier = |m: &dnal_zoo::PlainCnn| -> Vec<f32> {
        m.classifier.weight.val().into_data().try_to_vec().unwrap()
    };
    let before = classifier(&fresh);
    let (model, loaded) = load_pretrained(
        fresh,
        &fixture("vgg16_bn.pth"),
        &KeyMap::Torchvision,
        &["^classifier\\.".into()],
    )
    .unwrap();
    assert_eq!(
        loaded.excluded,
        vec![
            "classifier.bias".to_string(),
            "classifier.weight".to_string()
        ]
    );
    assert_eq!(
        before,
        classifier(&model),
        "an excluded tensor keeps its value"
    );
}

#[test]
fn a_wrong_network_or_missing_key_is_refused_with_the_names() {
    // ResNet weights into MobileNetV2: nothing fits, and the message says which.
    let e = load_err::<dnal_zoo::MobileNetV2>(
        &mobilenet(),
        &fixture("resnet50.pth"),
        &KeyMap::Torchvision,
        &[],
    );
    assert!(
        e.contains("not in the file: blocks.0.branch.depthwise.bn.beta"),
        "{e}"
    );
    assert!(
        e.contains("no place in the network for: model.bn1.bias"),
        "{e}"
    );
    // Without its top-level key, a training checkpoint's tensors are all misplaced, and the
    // message says what to write.
    let e = load_err::<dnal_zoo::BottleneckResNet>(
        &resnet(),
        &fixture("resnet50.pth"),
        &KeyMap::Torchvision,
        &[],
    );
    assert!(e.contains("resnet50.pth"), "{e}");
    assert!(e.contains("Every tensor sits under `model.`"), "{e}");
}

#[test]
fn bad_files_are_refused_not_panicked_on() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = vgg();
    let keys = KeyMap::Torchvision;
    let missing = dir.path().join("absent.pth");
    assert!(load_err::<dnal_zoo::PlainCnn>(&cfg, &missing, &keys, &[]).contains("no such file"));
    // The path is checked before the key map: a network without torchvision names is not told
    // to write a key map for a file that does not exist.
    let e = load_err::<dnal_zoo::PlainCnn>(&PlainCnnConfig::mnist_cnn(), &missing, &keys, &[]);
    assert!(e.contains("no such file"), "{e}");
    let e = load_err::<dnal_zoo::PlainCnn>(&cfg, dir.path(), &keys, &[]);
    assert!(e.contains("a folder, not a weights file"), "{e}");
    let bytes = std::fs::read(fixture("vgg16_bn.pth")).unwrap();
    let truncated = dir.path().join("truncated.pth");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err::<dnal_zoo::PlainCnn>(&cfg, &truncated, &keys, &[]);
    assert!(e.contains("truncated.pth"), "{e}");
    let st = std::fs::read(fixture("mobilenet_v2.safetensors")).unwrap();
    let truncated = dir.path().join("truncated.safetensors");
    std::fs::write(&truncated, &st[..st.len() - 100]).unwrap();
    let e = load_err::<dnal_zoo::MobileNetV2>(&mobilenet(), &truncated, &keys, &[]);
    assert!(e.contains("truncated.safetensors"), "{e}");
    let other = dir.path().join("weights.onnx");
    std::fs::write(&other, b"x").unwrap();
    let e = load_err::<dnal_zoo::PlainCnn>(&cfg, &other, &keys, &[]);
    assert!(e.contains(".safetensors"), "{e}");
}

#[test]
fn a_mapping_file_renames_other_sources() {
    let dir = tempfile::tempdir().unwrap();
    let map = dir.path().join("keys.toml");
    // A mapping file written from scratch for the MobileNetV2 fixture's first units, the rest
    // ignored: the loader must then report the network's tensors it did not get.
    std::fs::write(
        &map,
        r#"
ignore = ['^features\.([2-9]|1\d)\.', '^classifier\.']
[[rename]]
from = '^features\.0\.0\.'
to = 'stem.conv.'
[[rename]]
from = '^features\.0\.1\.'
to = 'stem.bn.'
[[rename]]
from = '^features\.1\.conv\.0\.0\.'
to = 'blocks.0.branch.depthwise.conv.'
[[rename]]
from = '^features\.1\.conv\.0\.1\.'
to = 'blocks.0.branch.depthwise.bn.'
[[rename]]
from = '^features\.1\.conv\.1\.'
to = 'blocks.0.branch.project.conv.'
[[rename]]
from = '^features\.1\.conv\.2\.'
to = 'blocks.0.branch.project.bn.'
"#,
    )
    .unwrap();
    let rules = KeyRules::from_file(&map).unwrap();
    let keys = KeyMap::Rules(rules);
    let file = fixture("mobilenet_v2.safetensors");
    let e = load_err::<dnal_zoo::MobileNetV2>(&mobilenet(), &file, &keys, &[]);
    assert!(
        e.contains("not in the file: blocks.1.branch.depthwise.bn.beta"),
        "{e}"
    );
    // Excluding what the map leaves out, the rest loads.
    let model = dnal_zoo::MobileNetV2::build(&mobilenet(), &Device::default()).unwrap();
    let exclude = [
        "^blocks\\.[1-9]".into(),
        "^last\\.".into(),
        "^classifier\\.".into(),
    ];
    let (_, loaded) = load_pretrained(model, &file, &keys, &exclude).unwrap();
    // Three conv -> BN units: a weight and four BatchNorm tensors each.
    assert_eq!(loaded.applied, 3 * (1 + 4), "{loaded}");
    // A broken mapping file names itself.
    std::fs::write(&map, "[[rename]]\nfrom = '('\nto = ''\n").unwrap();
    let rules = KeyRules::from_file(&map).unwrap();
    let e = load_err::<dnal_zoo::MobileNetV2>(&mobilenet(), &file, &KeyMap::Rules(rules), &[]);
    assert!(e.contains("bad pattern `(`"), "{e}");
    std::fs::write(&map, "renames = 3\n").unwrap();
    let e = KeyRules::from_file(&map).unwrap_err().to_string();
    assert!(e.contains("keys.toml") && e.contains("renames"), "{e}");
}

/// Every key of torchvision's full-size checkpoints lands on a tensor of the same shape in
/// dnal's full-size network, and every tensor of the network but the gates' gets one.
fn full_size_names_match<N: Network>(cfg: &N::Config, family: &str) {
    use burn::store::{BurnToPyTorchAdapter, ModuleSnapshot};
    let text = std::fs::read_to_string(fixture("full_size_keys.json")).unwrap();
    let all: serde_json::Value = serde_json::from_str(&text).unwrap();
    let model = N::build(cfg, &Device::default()).unwrap();
    let mapper = model.torchvision_keys().unwrap().mapper().unwrap();
    let mut ours: std::collections::BTreeMap<String, Vec<usize>> = model
        .collect(None, Some(Box::new(BurnToPyTorchAdapter)), true)
        .into_iter()
        .filter(|t| !t.name.contains(".gate."))
        .map(|t| (t.name.clone(), t.shape.to_vec()))
        .collect();
    let theirs: Vec<(String, Vec<usize>)> = all[family]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let shape = e[1].as_array().unwrap();
            (
                e[0].as_str().unwrap().to_string(),
                shape.iter().map(|d| d.as_u64().unwrap() as usize).collect(),
            )
        })
        .collect();
    let mut folded = 0;
    for (key, shape) in &theirs {
        let Some(name) = mapper.target(key) else {
            assert!(
                key.ends_with("num_batches_tracked"),
                "{family}: {key} ignored"
            );
            continue;
        };
        match ours.remove(&name) {
            Some(s) => assert_eq!(&s, shape, "{family}: {key} -> {name}"),
            None => {
                // A conv bias, folded into the next BatchNorm's running mean.
                let unit = name.strip_suffix(".conv.bias");
                assert!(
                    unit.is_some_and(|u| ours.contains_key(&format!("{u}.bn.running_mean"))
                        || theirs.iter().any(|(k, _)| mapper.target(k).as_deref()
                            == Some(&format!("{u}.bn.running_mean")))),
                    "{family}: {key} -> {name} has no place"
                );
                folded += 1;
            }
        }
    }
    assert!(
        ours.is_empty(),
        "{family}: not in torchvision's file: {ours:?}"
    );
    assert_eq!(folded, if family == "vgg16_bn" { 13 } else { 0 });
}

#[test]
fn torchvisions_full_size_checkpoints_fit_dnals_networks() {
    full_size_names_match::<dnal_zoo::PlainCnn>(&PlainCnnConfig::vgg16_imagenet(1000), "vgg16_bn");
    full_size_names_match::<dnal_zoo::BottleneckResNet>(
        &BottleneckResNetConfig::resnet50(1000),
        "resnet50",
    );
    full_size_names_match::<dnal_zoo::MobileNetV2>(
        &MobileNetV2Config::imagenet(1000),
        "mobilenet_v2",
    );
}

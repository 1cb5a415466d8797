//! Every family of the zoo, dense and pruned, exported to ONNX and run by tract (an independent
//! runtime): its logits equal burn's eval-mode forward on random images, at batch 1 and 3.
//! BatchNorm statistics, affine parameters and (in one case) searching gates are random, so
//! that every folding is exercised.

use burn::prelude::*;
use dnal_onnx::ExportOptions;
use dnal_zoo::*;
use tract_onnx::prelude::{
    Framework, InferenceModelExt, IntoRunnable, IntoTValue, tract_ndarray, tvec,
};

#[path = "../../dnal-zoo/tests/common/families.rs"]
mod families;
use families::{Check, assert_logits_close, burn_logits, images};

fn device() -> Device {
    Device::flex()
}

/// Exports a network, runs the file in tract at batch 1 and 3, and compares with burn.
struct Tract;

impl Check for Tract {
    fn check<N: Network>(&self, what: &str, net: &N) {
        let [c, h, w] = net.inference_graph().unwrap().input;
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("model.onnx");
        dnal_onnx::export(net, &path, &ExportOptions::default()).unwrap();
        let runnable = tract_onnx::onnx()
            .model_for_path(&path)
            .unwrap()
            .into_optimized()
            .unwrap()
            .into_runnable()
            .unwrap();
        for batch in [1, 3] {
            let shape = [batch, c, h, w];
            let x = images(shape, batch as u64);
            let want = burn_logits(net, &x, shape, &device());
            let input = tract_ndarray::Array4::from_shape_vec((batch, c, h, w), x).unwrap();
            let out = runnable
                .run(tvec!(
                    tract_onnx::prelude::Tensor::from(input).into_tvalue()
                ))
                .unwrap();
            let got: Vec<f32> = out[0]
                .to_plain_array_view::<f32>()
                .unwrap()
                .iter()
                .copied()
                .collect();
            assert_logits_close(&format!("{what} in tract"), batch, &got, &want);
        }
    }
}

#[test]
fn plain_cnns_round_trip() {
    families::plain_cnns(&device(), &Tract);
}

#[test]
fn cifar_resnets_round_trip() {
    families::cifar_resnets(&device(), &Tract);
}

#[test]
fn resnet50_round_trips() {
    families::bottleneck_resnets(&device(), &Tract);
}

#[test]
fn mobilenets_round_trip() {
    families::mobilenets(&device(), &Tract);
}

#[test]
fn supernets_round_trip() {
    families::supernets(&device(), &Tract);
}

#[test]
fn a_bad_opset_is_refused_and_nothing_written() {
    let net = PlainCnnConfig::mnist_cnn().init(&device()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("model.onnx");
    let opts = ExportOptions {
        opset: 9,
        ..Default::default()
    };
    let err = dnal_onnx::export(&net, &path, &opts)
        .unwrap_err()
        .to_string();
    assert!(err.contains("opset") && err.contains("11"), "{err}");
    assert!(!path.exists());
}

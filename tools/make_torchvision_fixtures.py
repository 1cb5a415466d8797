#!/usr/bin/env python3
"""Writes the small torchvision-layout checkpoints that dnal's pretrained-weights tests load.

Each network is built from torchvision's own modules, so its state_dict keys and its forward are
torchvision's, at widths small enough that the files are a few kilobytes:

* vgg16_bn.pth: torchvision's VGG with `make_layers(..., batch_norm=True)` in the VGG-16 layout
  (13 convs, pools after convs 1, 3, 6, 9, 12) and a three-layer classifier, on 32x32 images.
  At 224x224 the 7x7 adaptive average pool sees a 7x7 map and is the identity; on a 32x32
  image it would repeat the 1x1 map 49 times, so the fixture replaces it by that identity.
* resnet50.pth: torchvision's ResNet with its Bottleneck blocks (v1.5: stride on the 3x3 conv)
  in stages of 2, 1, 2, 1 blocks of 2, 4, 8, 16 planes, saved under a top-level "model" key as
  torchvision's reference training scripts do.
* mobilenet_v2.safetensors: torchvision's MobileNetV2 (width_mult 0.5, a short stage table) with
  its last 1x1 conv and classifier narrowed, saved with safetensors.

It also lists the state_dict keys and shapes of torchvision's full-size vgg16_bn, resnet50 and
mobilenet_v2 (1000 classes) in full_size_keys.json, so that a test can check every name of the
real checkpoints against dnal's full-size networks without a 100-500 MB download.

BatchNorm weights and running statistics are drawn at random (a fresh network's are 1 and 0,
which would not test where they land). The input of every network is a fixed formula of the
element index (dnal's test computes the same numbers) and the eval-mode logits are written to
expected.json.

Usage (needs torch, torchvision and safetensors from PyPI):
    python3 tools/make_torchvision_fixtures.py [--out crates/dnal-zoo/tests/fixtures/torchvision]
"""

import argparse
import json
import os

import torch
import torch.nn as nn
from safetensors.torch import save_file
import torchvision
from torchvision.models.mobilenetv2 import MobileNetV2
from torchvision.models.resnet import Bottleneck, ResNet
from torchvision.models.vgg import VGG, make_layers
from torchvision.ops.misc import Conv2dNormActivation

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "..", "crates", "dnal-zoo", "tests", "fixtures", "torchvision")

CLASSES = 10
SIDE = 32
BATCH = 2


def fixed_input():
    """x[k] = ((k * 7919) mod 1999) / 999.5 - 1 over the flattened [2, 3, 32, 32] input."""
    n = BATCH * 3 * SIDE * SIDE
    k = torch.arange(n, dtype=torch.float64)
    x = torch.remainder(k * 7919, 1999) / 999.5 - 1.0
    return x.to(torch.float32).reshape(BATCH, 3, SIDE, SIDE)


def randomise_batchnorms(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.num_batches_tracked.fill_(7)


def vgg16_bn():
    widths = [4, 4, "M", 8, 8, "M", 8, 8, 8, "M", 16, 16, 16, "M", 16, 16, 16, "M"]
    model = VGG(make_layers(widths, batch_norm=True), num_classes=CLASSES)
    model.avgpool = nn.Identity()
    model.classifier = nn.Sequential(
        nn.Linear(16, 12),
        nn.ReLU(True),
        nn.Dropout(),
        nn.Linear(12, 12),
        nn.ReLU(True),
        nn.Dropout(),
        nn.Linear(12, CLASSES),
    )
    return model


def resnet50():
    planes = [2, 4, 8, 16]
    layers = [2, 1, 2, 1]
    model = ResNet(Bottleneck, [1, 1, 1, 1], num_classes=CLASSES)
    # Rebuild every stage at small widths with torchvision's own _make_layer.
    model.inplanes = planes[0]
    model.conv1 = nn.Conv2d(3, planes[0], kernel_size=7, stride=2, padding=3, bias=False)
    model.bn1 = nn.BatchNorm2d(planes[0])
    model.layer1 = model._make_layer(Bottleneck, planes[0], layers[0])
    model.layer2 = model._make_layer(Bottleneck, planes[1], layers[1], stride=2)
    model.layer3 = model._make_layer(Bottleneck, planes[2], layers[2], stride=2)
    model.layer4 = model._make_layer(Bottleneck, planes[3], layers[3], stride=2)
    model.fc = nn.Linear(planes[3] * Bottleneck.expansion, CLASSES)
    return model


def mobilenet_v2():
    # t, c, n, s; c is halved by width_mult 0.5: widths 8, 8, 16, 16.
    setting = [[1, 16, 1, 1], [6, 16, 2, 2], [6, 32, 1, 1], [6, 32, 1, 2]]
    model = MobileNetV2(num_classes=CLASSES, width_mult=0.5, inverted_residual_setting=setting)
    last = len(model.features) - 1
    model.features[last] = Conv2dNormActivation(16, 24, kernel_size=1, activation_layer=nn.ReLU6)
    model.classifier[1] = nn.Linear(24, CLASSES)
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    x = fixed_input()
    expected = {}
    for name, build, save in [
        ("vgg16_bn.pth", vgg16_bn, lambda sd, p: torch.save(sd, p)),
        ("resnet50.pth", resnet50, lambda sd, p: torch.save({"model": sd, "epoch": 89}, p)),
        ("mobilenet_v2.safetensors", mobilenet_v2, save_file),
    ]:
        model = build()
        randomise_batchnorms(model)
        model.eval()
        with torch.no_grad():
            logits = model(x)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save(state, os.path.join(args.out, name))
        os.chmod(os.path.join(args.out, name), 0o644)
        expected[name] = {
            "input": list(x.shape),
            "logits": [[float(v) for v in row] for row in logits],
        }
        print(f"{name}: {len(state)} tensors, logits[0][:3] = {logits[0][:3].tolist()}")
    with open(os.path.join(args.out, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
        f.write("\n")
    full = {}
    for name in ["vgg16_bn", "resnet50", "mobilenet_v2"]:
        model = getattr(torchvision.models, name)(weights=None)
        full[name] = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    with open(os.path.join(args.out, "full_size_keys.json"), "w") as f:
        json.dump(full, f, separators=(",", ":"))
        f.write("\n")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""PyTorch eager's training step on the networks `dnal-train bench` times, for the GPU table of
benches/gpu/run.sh: one JSON line per network, in the fields `dnal-train bench --json` prints.

The step is the same: forward, cross-entropy, backward, SGD (lr 0.01, momentum 0.9, weight
decay 5e-4) on random images, gates bypassed (plain networks), median and fastest of the timed
steps after untimed warm-up steps, and the median time the Python thread took to queue a step
before waiting for the card (`issue_ms`).

* resnet56-cifar, vgg16-cifar: the networks of pytorch_reference.py (dnal's layouts);
* mobilenetv2-cifar: torchvision's MobileNetV2 with dnal's CIFAR strides (stem and second stage
  at stride 1); dnal's CIFAR variant also has conv shortcuts on stride-1 width changes (three
  1x1 convs, about 1 % of its MACs) that torchvision's lacks;
* resnet50-imagenet: torchvision's resnet50, 224x224, 1000 classes.

`--architectures NAMES` times, after them, the networks pruned to architectures under
benches/architectures/ (`resnet56-cifar10`, `resnet56-thin-cifar10`, `vgg16-cifar10`,
`mobilenetv2-cifar10`), built by pytorch_reference.py at the pruned widths (its MobileNetV2 is
dnal's CIFAR variant, conv shortcuts included), as `dnal-train bench --architecture` times
dnal's: the final stage's step. Their lines carry `architecture` (the name) and `macs`.

On cuda, cuDNN's autotuner is on (`torch.backends.cudnn.benchmark`, as torchvision's training
references set it; dnal's cuda and wgpu backends autotune too); `--no-cudnn-benchmark` turns it
off. PyTorch's precision defaults are kept: convolutions may use TF32 on Ampere and later,
matrix products do not; each JSON line records both settings.

Usage: python3 benches/reference/pytorch_gpu_steps.py [--device cuda] [--steps 10] [--warmup 3]
    [--only NAMES] [--batch N] [--architectures NAMES]
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pytorch_reference import (  # noqa: E402
    ARCHITECTURES, CifarResNet, MobileNetV2Cifar, macs, set_search, vgg16_cifar)


def mobilenetv2_cifar():
    setting = [[1, 16, 1, 1], [6, 24, 2, 1], [6, 32, 3, 2], [6, 64, 4, 2],
               [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]
    model = torchvision.models.MobileNetV2(num_classes=10, inverted_residual_setting=setting)
    model.features[0][0].stride = (1, 1)
    return model


NETWORKS = [
    ("resnet56-cifar", lambda: CifarResNet(), 128, 32, 10),
    ("vgg16-cifar", vgg16_cifar, 128, 32, 10),
    ("mobilenetv2-cifar", mobilenetv2_cifar, 128, 32, 10),
    ("resnet50-imagenet", lambda: torchvision.models.resnet50(), 64, 224, 1000),
]


# The network a checked-in architecture prunes, by the architecture's name, and its builder.
PRUNED = {
    "resnet56-cifar10": ("resnet56-cifar", CifarResNet),
    "resnet56-thin-cifar10": ("resnet56-cifar", CifarResNet),
    "vgg16-cifar10": ("vgg16-cifar", vgg16_cifar),
    "mobilenetv2-cifar10": ("mobilenetv2-cifar", MobileNetV2Cifar),
}


def time_steps(model, device, batch, size, classes, warmup, steps):
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.rand(batch, 3, size, size, device=device) * 4 - 2
    y = torch.randint(0, classes, (batch,), device=device)
    times, issued = [], []
    start, warmup_s = time.perf_counter(), 0.0
    for i in range(warmup + steps):
        if i == warmup:
            warmup_s = time.perf_counter() - start
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        queued = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - t) * 1e3)
            issued.append((queued - t) * 1e3)
    return times, issued, warmup_s


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--only", help="comma-separated network names")
    p.add_argument("--batch", type=int,
                   help="images per step for every network (default: 128 for CIFAR, 64 for ImageNet)")
    p.add_argument("--architectures",
                   help="comma-separated architectures under benches/architectures/ to time pruned "
                        "networks of too (" + ", ".join(PRUNED) + ")")
    p.add_argument("--no-cudnn-benchmark", action="store_true",
                   help="leave cuDNN's autotuner off (PyTorch's default)")
    p.add_argument("--no-tf32", action="store_true",
                   help="compute convolutions in full f32 (PyTorch's default lets cuDNN use TF32)")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
    if args.no_tf32:
        torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    only = set(args.only.split(",")) if args.only else None
    if args.batch is not None and args.batch < 1:
        p.error(f"--batch must be at least 1, not {args.batch}")
    pruned = args.architectures.split(",") if args.architectures else []
    for a in pruned:
        if a not in PRUNED:
            p.error(f"no architecture `{a}`; choose among " + ", ".join(PRUNED))
    runs = [(name, build, batch, size, classes, None) for name, build, batch, size, classes in NETWORKS
            if not only or name in only]
    for a in pruned:
        name, build = PRUNED[a]
        with open(os.path.join(ARCHITECTURES, a + ".json")) as f:
            arch = json.load(f)
        runs.append((name, lambda build=build, arch=arch: build(arch), 128, 32, 10, a))
    for name, build, batch, size, classes, arch in runs:
        batch = args.batch or batch
        start = time.perf_counter()
        model = build().to(device)
        set_search(model, False)
        built = time.perf_counter() - start
        extra = {} if arch is None else {
            "architecture": arch, "macs": macs(model, device, (3, size, size))}
        ms, issued, warmup_s = time_steps(model, device, batch, size, classes, args.warmup,
                                          args.steps)
        print(json.dumps({
            "model": name, "backend": f"pytorch-{device.type}", "batch": batch, "size": size,
            "gates": "bypass", **extra,
            "median_ms": statistics.median(ms), "min_ms": min(ms), "steps": len(ms),
            "issue_ms": statistics.median(issued), "warmup_s": built + warmup_s,
            "torch": torch.__version__,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "conv_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
        }), flush=True)


if __name__ == "__main__":
    main()

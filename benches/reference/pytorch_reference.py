#!/usr/bin/env python3
"""PyTorch reference figures for dnal's network benchmark (benches/benches/network.rs).

The same networks, built the same way (ResNet-56 with parameter-free zero-padding shortcuts,
VGG-16-BN for CIFAR with a 512-unit BN hidden layer), the same channel gate
(x * sigmoid(beta * alpha) * mask per channel after BatchNorm), the same batch sizes and the
same pruned widths (read from benches/architectures/*.json, pruned streams computed as dnal
computes them):

* train step: forward + cross-entropy + backward + SGD with momentum, batch 128, 3x32x32, gates
  in search mode and bypassed (the plain network);
* inference: eval-mode forward of the dense and the pruned network, batch 1 and 64, for the
  networks of the benchmark's inference group: ResNet-56 (and a thin one), VGG-16, MobileNetV2
  for CIFAR and the MNIST demo's CNN (1x28x28 images). The training step is timed for the first
  three (MobileNetV2's is in pytorch_gpu_steps.py).

Usage (CPU, as many threads as burn uses):
    python3 benches/reference/pytorch_reference.py --threads 2
On a GPU: --device cuda. Prints a Markdown table and, with --json FILE, writes the figures.
"""

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ARCHITECTURES = os.path.join(HERE, "..", "architectures")


class Gate(nn.Module):
    """sigmoid(beta * alpha) * mask per channel; identity when bypassed."""

    def __init__(self, channels):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(channels))
        self.register_buffer("beta", torch.tensor(100.0))
        self.register_buffer("mask", torch.ones(channels))
        self.search = False

    def forward(self, x):
        if not self.search:
            return x
        factor = torch.sigmoid(self.beta * self.alpha) * self.mask
        return x * factor.view(1, -1, *([1] * (x.dim() - 2)))


class ConvBnGate(nn.Module):
    def __init__(self, cin, cout, stride=1, kernel=3, groups=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.gate = Gate(cout)

    def forward(self, x):
        return self.gate(self.bn(self.conv(x)))


def kept(arch, name, width):
    if arch is None:
        return list(range(width))
    return list(arch["gates"][name]["kept"])


def positions(stream, channels):
    where = {c: i for i, c in enumerate(stream)}
    return torch.tensor([where[c] for c in channels], dtype=torch.long)


def add_into(x, pos, values):
    if len(pos) == x.shape[1]:
        return x + values
    return x.index_add(1, pos.to(x.device), values)


def scatter(width, pos, values):
    if values.shape[1] == width:
        return values
    n, _, h, w = values.shape
    return add_into(values.new_zeros(n, width, h, w), pos, values)


class CifarResNet(nn.Module):
    """ResNet-56 for CIFAR; with `arch`, pruned as dnal prunes it (streams are the union of
    the kept channels of every gate writing into them)."""

    def __init__(self, arch=None, blocks_per_stage=9, num_classes=10):
        super().__init__()
        widths = [16, 32, 64]
        self.widths, self.per = widths, blocks_per_stage
        self.stem_kept = kept(arch, "stem", 16)
        self.block_kept = []
        for s, w in enumerate(widths):
            for b in range(blocks_per_stage):
                inner = kept(arch, f"s{s}.b{b}.inner", w)
                out = kept(arch, f"s{s}.b{b}.out", w)
                self.block_kept.append((inner, out) if inner and out else None)
        streams = []
        for s, w in enumerate(widths):
            present = set(self.stem_kept) if s == 0 else {c + (w - widths[s - 1]) // 2 for c in streams[s - 1]}
            for k in self.block_kept[s * blocks_per_stage:(s + 1) * blocks_per_stage]:
                if k:
                    present |= set(k[1])
            streams.append(sorted(present))
        self.streams = streams
        self.stem = ConvBnGate(3, len(self.stem_kept))
        self.stem_pos = positions(streams[0], self.stem_kept)
        self.blocks = nn.ModuleList()
        self.out_pos, self.shortcut_pos = [], []
        for i, k in enumerate(self.block_kept):
            s = i // blocks_per_stage
            first = s > 0 and i % blocks_per_stage == 0
            cin = len(streams[s - 1] if first else streams[s])
            if first:
                pad = (widths[s] - widths[s - 1]) // 2
                self.shortcut_pos.append(positions(streams[s], [c + pad for c in streams[s - 1]]))
            else:
                self.shortcut_pos.append(None)
            if k is None:
                self.blocks.append(nn.Identity())
                self.out_pos.append(None)
                continue
            self.blocks.append(nn.ModuleList([
                ConvBnGate(cin, len(k[0]), 2 if first else 1),
                ConvBnGate(len(k[0]), len(k[1])),
            ]))
            self.out_pos.append(positions(streams[s], k[1]))
        self.fc = nn.Linear(len(streams[-1]), num_classes)

    def forward(self, x):
        x = scatter(len(self.streams[0]), self.stem_pos, F.relu(self.stem(x)))
        for i, block in enumerate(self.blocks):
            s = i // self.per
            inp = x
            if self.shortcut_pos[i] is not None:
                x = scatter(len(self.streams[s]), self.shortcut_pos[i], x[:, :, ::2, ::2])
            if self.out_pos[i] is not None:
                conv1, conv2 = block
                out = conv2(F.relu(conv1(inp)))
                x = F.relu(add_into(x, self.out_pos[i], out))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class PlainCnn(nn.Module):
    """dnal's plain CNN: gated 3x3 convs with ReLU, 2x2 max-pools after some, then a global
    average pool or a flatten, optional hidden layers (linear, BN, ReLU), the classifier."""

    def __init__(self, widths, pool_after, arch=None, in_channels=3, global_pool=False,
                 hidden=(), num_classes=10):
        super().__init__()
        layers, cin = [], in_channels
        for i, w in enumerate(widths):
            cout = len(kept(arch, f"conv{i}", w))
            layers.append(ConvBnGate(cin, cout))
            cin = cout
        self.convs = nn.ModuleList(layers)
        self.pool_after, self.global_pool = set(pool_after), global_pool
        self.hidden = nn.ModuleList()
        for h in hidden:
            self.hidden.append(nn.Sequential(nn.Linear(cin, h), nn.BatchNorm1d(h), nn.ReLU()))
            cin = h
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        for i, unit in enumerate(self.convs):
            x = F.relu(unit(x))
            if i in self.pool_after:
                x = F.max_pool2d(x, 2)
        if self.global_pool:
            x = F.adaptive_avg_pool2d(x, 1)
        x = torch.flatten(x, 1)
        for h in self.hidden:
            x = h(x)
        return self.fc(x)


def vgg16_cifar(arch=None):
    """VGG-16-BN for CIFAR: 13 gated convs, max-pool after convs 1, 3, 6, 9, 12, a 512-unit
    BatchNorm hidden layer, the classifier."""
    widths = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    return PlainCnn(widths, [1, 3, 6, 9, 12], arch, hidden=[512])


def mnist_cnn(arch=None):
    """The MNIST demo's CNN: gated convs 32-32 (pool) 64-64 (pool), global average pool."""
    return PlainCnn([32, 32, 64, 64], [1, 3], arch, in_channels=1, global_pool=True)


class MobileNetV2Cifar(nn.Module):
    """dnal's MobileNetV2 for CIFAR (stem and second stage at stride 1, a 1x1 conv + BN shortcut
    on the stride-1 blocks that change the width), gates after every depthwise BN and every
    projection BN and after the last 1x1 conv. With `arch`, pruned as dnal prunes it: each
    stage's stream is the union of what writes into it, a block adds its kept outputs into
    their stream positions, a block whose projection keeps nothing is removed."""

    STAGES = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
              (6, 160, 3, 2), (6, 320, 1, 1)]
    STEM, LAST = 32, 1280

    def __init__(self, arch=None, num_classes=10):
        super().__init__()
        layout = [(s, b == 0) for s, st in enumerate(self.STAGES) for b in range(st[2])]
        in_width = [self.STEM] + [st[1] for st in self.STAGES[:-1]]

        def join(s, first):
            _, width, _, stride = self.STAGES[s]
            if not first or (stride == 1 and in_width[s] == width):
                return "identity"
            return "conv" if stride == 1 else "replace"

        full_in = self.STEM
        blocks = []  # (expanded channels, output channels) kept, as indices of the full block
        for i, (s, _) in enumerate(layout):
            t, width = self.STAGES[s][:2]
            out = kept(arch, f"b{i}.proj", width)
            dw = kept(arch, f"b{i}.dw", full_in * t)
            blocks.append((dw, out) if out else None)
            full_in = width
        # The CIFAR layout's first block has a conv shortcut, so the stem keeps its 32 channels.
        assert join(0, True) != "replace"
        stem = list(range(self.STEM))
        streams = []
        for s, (_, width, _, _) in enumerate(self.STAGES):
            present = set()
            for i, (bs, first) in enumerate(layout):
                if bs != s:
                    continue
                j = join(s, first)
                if j == "conv":
                    present |= set(range(width))
                elif j == "identity" and first:
                    present |= set(stem if s == 0 else streams[s - 1])
                if blocks[i]:
                    present |= set(blocks[i][1])
            streams.append(sorted(present))
        self.layout, self.joins = layout, [join(s, f) for s, f in layout]
        self.streams = streams
        self.stem = nn.Sequential(nn.Conv2d(3, len(stem), 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(len(stem)))
        self.branches, self.shortcuts = nn.ModuleList(), nn.ModuleList()
        self.taps, self.out_pos, self.widen_pos = [], [], []
        for i, (s, first) in enumerate(layout):
            t, width, _, stride = self.STAGES[s]
            source = stem if s == 0 and first else streams[s - 1] if first else streams[s]
            cin = len(source)
            self.widen_pos.append(positions(streams[s], streams[s - 1])
                                  if first and s > 0 and self.joins[i] == "identity" else None)
            self.shortcuts.append(nn.Sequential(nn.Conv2d(cin, width, 1, bias=False),
                                                nn.BatchNorm2d(width))
                                  if self.joins[i] == "conv" else nn.Identity())
            if blocks[i] is None:
                self.branches.append(nn.Identity())
                self.taps.append(None)
                self.out_pos.append(None)
                continue
            dw, out = blocks[i]
            layers = []
            if t != 1:
                layers += [nn.Conv2d(cin, len(dw), 1, bias=False), nn.BatchNorm2d(len(dw)),
                           nn.ReLU6()]
                self.taps.append(None)
            else:
                self.taps.append(positions(source, dw) if len(dw) != cin else None)
            layers += [ConvBnGate(len(dw), len(dw), stride if first else 1, groups=len(dw)),
                       nn.ReLU6(), ConvBnGate(len(dw), len(out), kernel=1)]
            self.branches.append(nn.Sequential(*layers))
            self.out_pos.append(positions(streams[s], out))
        self.last = ConvBnGate(len(streams[-1]), len(kept(arch, "last", self.LAST)), kernel=1)
        self.fc = nn.Linear(self.last.conv.out_channels, num_classes)

    def forward(self, x):
        x = F.relu6(self.stem(x))
        for i, (s, first) in enumerate(self.layout):
            inp = x
            out = None
            if self.out_pos[i] is not None:
                taps = self.taps[i]
                out = self.branches[i](inp if taps is None else inp.index_select(1, taps.to(x.device)))
            width = len(self.streams[s])
            if self.joins[i] == "replace":
                x = scatter(width, self.out_pos[i], out)
                continue
            if self.joins[i] == "conv":
                base = self.shortcuts[i](inp)
            elif self.widen_pos[i] is not None:
                base = scatter(width, self.widen_pos[i], inp)
            else:
                base = inp
            x = base if out is None else add_into(base, self.out_pos[i], out)
        x = F.relu6(self.last(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def macs(model, device, image=(3, 32, 32)):
    """Multiply-accumulates of one image (convs and linear layers)."""
    total = [0]

    def conv_hook(m, _inp, out):
        total[0] += out[0].numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]

    def linear_hook(m, _inp, _out):
        total[0] += m.in_features * m.out_features

    hooks = [m.register_forward_hook(conv_hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    hooks += [m.register_forward_hook(linear_hook) for m in model.modules() if isinstance(m, nn.Linear)]
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, *image, device=device))
    for h in hooks:
        h.remove()
    return total[0]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, device, warmup, reps):
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def set_search(model, on):
    for m in model.modules():
        if isinstance(m, Gate):
            m.search = on


def train_step_seconds(model, device, batch, reps):
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.rand(batch, 3, 32, 32, device=device)
    y = torch.arange(batch, device=device) % 10

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return median_seconds(step, device, 2, reps)


def inference_seconds(model, device, batch, reps, image=(3, 32, 32)):
    model.eval()
    x = torch.rand(batch, *image, device=device)

    def run():
        with torch.inference_mode():
            model(x)

    return median_seconds(run, device, 3, reps)


CIFAR = (3, 32, 32)
# name: (builder, architecture under benches/architectures/, input image, training step timed)
NETWORKS = {
    "resnet56": (CifarResNet, "resnet56-cifar10.json", CIFAR, True),
    "resnet56-thin": (CifarResNet, "resnet56-thin-cifar10.json", CIFAR, False),
    "vgg16": (vgg16_cifar, "vgg16-cifar10.json", CIFAR, True),
    "mobilenetv2": (MobileNetV2Cifar, "mobilenetv2-cifar10.json", CIFAR, False),
    "mnist-cnn": (mnist_cnn, "mnist-cnn.json", (1, 28, 28), False),
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per figure (median)")
    p.add_argument("--only", choices=["train", "inference"], help="run one half only")
    p.add_argument("--nets", help="comma-separated networks to run (default: all of " + ", ".join(NETWORKS) + ")")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads")
    results = {}
    for name, (build, arch_file, image, trains) in NETWORKS.items():
        if args.nets and name not in args.nets.split(","):
            continue
        with open(os.path.join(ARCHITECTURES, arch_file)) as f:
            arch = json.load(f)
        dense = build().to(device)
        r = results[name] = {"dense_macs": macs(dense, device, image)}
        if args.only != "inference" and trains:
            for mode in ["search", "bypass"]:
                set_search(dense, mode == "search")
                s = train_step_seconds(dense, device, 128, args.reps)
                r[f"train_{mode}_s"] = s
                print(f"{name} train step, gates {mode}: {s * 1e3:.0f} ms ({128 / s:.1f} images/s)")
            set_search(dense, False)
        if args.only != "train":
            pruned = build(arch).to(device)
            r["pruned_macs"] = macs(pruned, device, image)
            print(f"{name}: {r['dense_macs'] / 1e6:.2f}M MACs dense, {r['pruned_macs'] / 1e6:.2f}M pruned "
                  f"({r['dense_macs'] / r['pruned_macs']:.2f}x fewer)")
            for batch in [1, 64]:
                for label, model in [("dense", dense), ("pruned", pruned)]:
                    s = inference_seconds(model, device, batch, max(args.reps, 10), image)
                    r[f"infer_{label}_b{batch}_s"] = s
                    print(f"{name} inference {label} batch {batch}: {s * 1e3:.2f} ms")
    print()
    print("| network | train search | train bypass | gate overhead | batch 1 dense / pruned "
          "| batch 64 dense / pruned | speed-up / MACs reduction at 1, 64 |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        cells = [name]
        if "train_search_s" in r:
            cells += [f"{r['train_search_s']:.2f} s ({128 / r['train_search_s']:.0f} img/s)",
                      f"{r['train_bypass_s']:.2f} s ({128 / r['train_bypass_s']:.0f} img/s)",
                      f"{(r['train_search_s'] / r['train_bypass_s'] - 1) * 100:+.1f} %"]
        else:
            cells += ["-", "-", "-"]
        if "infer_dense_b64_s" in r:
            reduction = r["dense_macs"] / r["pruned_macs"]
            ratios = []
            for batch in [1, 64]:
                dense_s, pruned_s = r[f"infer_dense_b{batch}_s"], r[f"infer_pruned_b{batch}_s"]
                cells.append(f"{dense_s * 1e3:.2f} / {pruned_s * 1e3:.2f} ms")
                ratios.append(f"{dense_s / pruned_s / reduction:.2f}")
            cells.append(f"{reduction:.2f}x fewer: " + ", ".join(ratios))
        else:
            cells += ["-", "-", "-"]
        print("| " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "device": str(device), "threads": args.threads,
                       "results": results}, f, indent=2)


if __name__ == "__main__":
    main()

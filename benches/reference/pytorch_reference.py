#!/usr/bin/env python3
"""PyTorch reference figures for dnal's network benchmark (benches/benches/network.rs).

The same networks, built the same way (ResNet-56 with parameter-free zero-padding shortcuts,
VGG-16-BN for CIFAR with a 512-unit BN hidden layer), the same channel gate
(x * sigmoid(beta * alpha) * mask per channel after BatchNorm), the same batch sizes and the
same pruned widths (read from benches/architectures/*.json, pruned streams computed as dnal
computes them):

* train step: forward + cross-entropy + backward + SGD with momentum, batch 128, 3x32x32, gates
  in search mode and bypassed (the plain network);
* inference: eval-mode forward of the dense and the pruned network, batch 1 and 64.

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
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
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


class Vgg16Cifar(nn.Module):
    """VGG-16-BN for CIFAR: 13 gated convs, max-pool after convs 1, 3, 6, 9, 12, a 512-unit
    BatchNorm hidden layer, the classifier."""

    WIDTHS = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    POOL_AFTER = {1, 3, 6, 9, 12}

    def __init__(self, arch=None, num_classes=10):
        super().__init__()
        layers, cin = [], 3
        for i, w in enumerate(self.WIDTHS):
            cout = len(kept(arch, f"conv{i}", w))
            layers.append(ConvBnGate(cin, cout))
            cin = cout
        self.convs = nn.ModuleList(layers)
        self.hidden = nn.Linear(cin, 512)
        self.hidden_bn = nn.BatchNorm1d(512)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        for i, unit in enumerate(self.convs):
            x = F.relu(unit(x))
            if i in self.POOL_AFTER:
                x = F.max_pool2d(x, 2)
        x = F.relu(self.hidden_bn(self.hidden(torch.flatten(x, 1))))
        return self.fc(x)


def macs(model, device):
    """Multiply-accumulates of one 3x32x32 image (convs and linear layers)."""
    total = [0]

    def conv_hook(m, _inp, out):
        total[0] += out[0].numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]

    def linear_hook(m, _inp, _out):
        total[0] += m.in_features * m.out_features

    hooks = [m.register_forward_hook(conv_hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    hooks += [m.register_forward_hook(linear_hook) for m in model.modules() if isinstance(m, nn.Linear)]
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32, device=device))
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


def inference_seconds(model, device, batch, reps):
    model.eval()
    x = torch.rand(batch, 3, 32, 32, device=device)

    def run():
        with torch.inference_mode():
            model(x)

    return median_seconds(run, device, 3, reps)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per figure (median)")
    p.add_argument("--only", choices=["train", "inference"], help="run one half only")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads")
    nets = {"resnet56": CifarResNet, "vgg16": Vgg16Cifar}
    results = {}
    for name, build in nets.items():
        with open(os.path.join(ARCHITECTURES, f"{name}-cifar10.json")) as f:
            arch = json.load(f)
        dense = build().to(device)
        r = results[name] = {"dense_macs": macs(dense, device)}
        if args.only != "inference":
            for mode in ["search", "bypass"]:
                set_search(dense, mode == "search")
                s = train_step_seconds(dense, device, 128, args.reps)
                r[f"train_{mode}_s"] = s
                print(f"{name} train step, gates {mode}: {s * 1e3:.0f} ms ({128 / s:.1f} images/s)")
            set_search(dense, False)
        if args.only != "train":
            pruned = build(arch).to(device)
            r["pruned_macs"] = macs(pruned, device)
            print(f"{name}: {r['dense_macs'] / 1e6:.2f}M MACs dense, {r['pruned_macs'] / 1e6:.2f}M pruned "
                  f"({r['dense_macs'] / r['pruned_macs']:.2f}x fewer)")
            for batch in [1, 64]:
                for label, model in [("dense", dense), ("pruned", pruned)]:
                    s = inference_seconds(model, device, batch, max(args.reps, 10))
                    r[f"infer_{label}_b{batch}_s"] = s
                    print(f"{name} inference {label} batch {batch}: {s * 1e3:.2f} ms")
    print()
    print("| network | train search | train bypass | gate overhead | batch-64 dense / pruned | speed-up / MACs ratio |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        cells = [name]
        if "train_search_s" in r:
            cells += [f"{r['train_search_s']:.2f} s ({128 / r['train_search_s']:.0f} img/s)",
                      f"{r['train_bypass_s']:.2f} s ({128 / r['train_bypass_s']:.0f} img/s)",
                      f"{(r['train_search_s'] / r['train_bypass_s'] - 1) * 100:+.1f} %"]
        else:
            cells += ["-", "-", "-"]
        if "infer_dense_b64_s" in r:
            speed = r["infer_dense_b64_s"] / r["infer_pruned_b64_s"]
            ratio = r["dense_macs"] / r["pruned_macs"]
            cells += [f"{r['infer_dense_b64_s'] * 1e3:.1f} / {r['infer_pruned_b64_s'] * 1e3:.1f} ms",
                      f"{speed:.2f}x / {ratio:.2f}x = {speed / ratio:.2f}"]
        else:
            cells += ["-", "-"]
        print("| " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "device": str(device), "threads": args.threads,
                       "results": results}, f, indent=2)


if __name__ == "__main__":
    main()

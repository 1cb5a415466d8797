"""The usual PyTorch ImageNet loader's per-image work, timed on one core.

For each JPEG: torchvision's default loader (Pillow: open, decode, convert to RGB), then
RandomResizedCrop(224), RandomHorizontalFlip, ToTensor and Normalize, as torchvision's ImageNet
example composes them. With torchvision installed those transforms are used; without it, the
same operations are written with Pillow and NumPy (crop then bilinear resize, which is what
torchvision's RandomResizedCrop calls on a PIL image, then the float conversion).

Compare with dnal's criterion group `data/imagenet-photo-jpeg-rrc224-batch-8/1-thread`, on the
same files, in the same sitting:

    cargo run --release -p dnal-benches --example photo_jpegs -- /tmp/photo-jpegs
    python3 benches/reference/pillow_loader.py /tmp/photo-jpegs
"""

import argparse
import math
import os
import random
import sys
import time

import numpy as np
from PIL import Image

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(3, 1, 1)


def pil_loader(path):
    with open(path, "rb") as f:
        img = Image.open(f)
        return img.convert("RGB")


def window(height, width, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop.get_params."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def numpy_transform(rng):
    def apply(img):
        top, left, h, w = window(img.height, img.width, rng)
        img = img.crop((left, top, left + w, top + h)).resize((224, 224), Image.BILINEAR)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        x = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
        return (x - MEAN) / STD

    return apply


def torchvision_transform():
    import torch
    from torchvision import transforms

    torch.set_num_threads(1)
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(224),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean=MEAN.ravel().tolist(), std=STD.ravel().tolist()),
        ]
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a folder of JPEGs")
    parser.add_argument("--seconds", type=float, default=5.0, help="time per measurement")
    parser.add_argument("--repeats", type=int, default=5, help="measurements (median reported)")
    parser.add_argument(
        "--no-torchvision", action="store_true", help="Pillow + NumPy even if torchvision exists"
    )
    args = parser.parse_args()
    paths = sorted(
        os.path.join(args.folder, f)
        for f in os.listdir(args.folder)
        if f.lower().endswith((".jpeg", ".jpg"))
    )
    if not paths:
        sys.exit(f"no JPEGs in {args.folder}")
    transform, kind = None, "pillow+numpy"
    if not args.no_torchvision:
        try:
            transform, kind = torchvision_transform(), "torchvision"
        except ImportError:
            pass
    if transform is None:
        random.seed(0)
        transform = numpy_transform(random.Random(0))
    for p in paths:  # warm-up, and the files into the page cache
        transform(pil_loader(p))
    rates = []
    for _ in range(args.repeats):
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < args.seconds:
            for p in paths:
                transform(pil_loader(p))
            n += len(paths)
        rates.append(n / (time.perf_counter() - start))
    rates.sort()
    import PIL

    print(
        f"{kind} (Pillow {PIL.__version__}), {len(paths)} JPEGs, one thread: "
        f"median {rates[len(rates) // 2]:.0f} images/s (runs: {', '.join(f'{r:.0f}' for r in rates)})"
    )


if __name__ == "__main__":
    main()

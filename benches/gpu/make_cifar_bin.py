#!/usr/bin/env python3
"""Writes a CIFAR-10-shaped data set in the official binary format (cifar-10-batches-bin:
data_batch_1..5.bin, test_batch.bin, batches.meta.txt; each record one label byte and 3072
pixel bytes, red plane then green then blue), with random pixels and labels: for timing a
training run where the real archive cannot be downloaded. Each file holds the official 10,000
records (dnal's loader rejects files of any other size as truncated); a run takes fewer with
`--set data.train_limit=N`. Standard library only.

Usage: python3 benches/gpu/make_cifar_bin.py OUT_DIR
"""

import argparse
import os
import random

PER_FILE = 10000


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    args = p.parse_args()
    root = os.path.join(args.out, "cifar-10-batches-bin")
    os.makedirs(root, exist_ok=True)
    rng = random.Random(0)
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    for name in names:
        with open(os.path.join(root, name), "wb") as f:
            for _ in range(PER_FILE):
                f.write(bytes([rng.randrange(10)]))
                f.write(rng.randbytes(3072))
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(os.path.join(root, "batches.meta.txt"), "w") as f:
        f.write("\n".join(classes) + "\n")
    print(f"{root}: {len(names)} files of {PER_FILE} records")


if __name__ == "__main__":
    main()

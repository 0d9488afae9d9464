"""Many processes, one model: torchrun, DistributedDataParallel, and BatchNorm statistics
that agree across ranks before anything is saved.

Under ``torchrun`` every process trains a replica on its shard of each epoch (gloo on
CPU, NCCL on CUDA). DDP averages gradients, so weights stay identical; BatchNorm's running
statistics do not, because each replica updates them from its own batches. At the end of
every epoch they are pooled across ranks with all-reduces, by the law of total variance
(``bnexport.distributed.bn_statistics``), so every rank holds the same buffers at every epoch boundary: a
checkpoint or a resumed run is the same whichever rank it came from. ``--recalibrate-bn``
instead recomputes them exactly over the training set at the end, each rank on its part.
``--sync-bn`` (CUDA only) converts BN layers to ``nn.SyncBatchNorm`` for training and back
to plain BatchNorm for export.

Without torchrun, ``process_group`` yields a one-process ``Replicas`` that touches no
process group, and training runs exactly as before.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from .bn_statistics import Moments, batchnorm_layers, layer_spread, pool, recompute_running_stats, training_batches, values_per_sample
from ..config import DEFAULT_DIST_TIMEOUT_S, DEVICES
# the error classes live in errors.py, so that the CLI reports them without importing torch
from ..errors import BnexportError, DistributedFailure, SharedError, first_line

BACKENDS = {"cpu": "gloo", "cuda": "nccl"}
RANK_SEED_STRIDE = 1_000_003  # gives each rank its own augmentation stream; rank 0 keeps the one-process stream

T = TypeVar("T")


# Launch: what torchrun told this process -------------------------------------------------

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# torch 2.14 renamed DDP's broadcast_buffers to forward_sync_buffers and deprecated the old name.
NO_FORWARD_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    else {"broadcast_buffers": False}
)


@dataclass(frozen=True)
class Launch:
    rank: int
    world_size: int
    local_rank: int

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "Launch | None":
        """None without torchrun; otherwise its variables, checked.

        RANK or WORLD_SIZE mark a torchrun worker (it always sets both). MASTER_ADDR alone
        does not: some clusters export it for every job, and a plain run must stay plain.
        """
        if not (env.get("RANK") or env.get("WORLD_SIZE")):
            return None
        present = [name for name in LAUNCH_VARIABLES if env.get(name)]
        missing = [name for name in LAUNCH_VARIABLES if not env.get(name)]
        if missing:
            raise BnexportError(f"distributed launch: {', '.join(present)} set but {', '.join(missing)} missing; "
                                f"start bnexport with torchrun, which sets them all")
        try:
            rank, world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
            local_rank = int(env.get("LOCAL_RANK", "0"))
        except ValueError:
            raise BnexportError(f"distributed launch: RANK={env['RANK']!r}, WORLD_SIZE={env['WORLD_SIZE']!r} "
                                f"and LOCAL_RANK={env.get('LOCAL_RANK')!r} must be integers") from None
        if world_size < 1 or not 0 <= rank < world_size:
            raise BnexportError(f"inconsistent world size: RANK={rank} needs 0 <= RANK < WORLD_SIZE={world_size}")
        if local_rank < 0:
            raise BnexportError(f"distributed launch: LOCAL_RANK={local_rank} is negative")
        return cls(rank, world_size, local_rank)


def resolve_device(name: str, *, local_rank: int = 0) -> torch.device:
    """``auto`` is CUDA when present. ``cpu`` never touches CUDA; ``cuda`` without it is bad input."""
    if name == "cpu":
        return torch.device("cpu")
    if name not in DEVICES:
        raise BnexportError(f"--device must be one of {', '.join(DEVICES)}, got {name!r}")
    available = torch.cuda.is_available()
    if name == "auto" and not available:
        return torch.device("cpu")
    if not available:
        raise BnexportError("--device cuda: no CUDA device is available here (torch.cuda.is_available() is False); "
                            "use --device cpu or auto")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise BnexportError(f"--device {name}: LOCAL_RANK {local_rank} needs a GPU of its own, but this machine has {count}; "
                            f"start at most {count} processes per node")
    return torch.device("cuda", local_rank)


# Shards: DistributedSampler's rule, as a pure function ------------------------------------

def shard_size(num_samples: int, world_size: int) -> int:
    return math.ceil(num_samples / world_size)


def shard_order(order: torch.Tensor, *, rank: int, world_size: int) -> torch.Tensor:
    """This rank's part of one epoch's global ``order``, as ``DistributedSampler`` cuts it.

    The order is padded by repeating its head to a multiple of ``world_size``, so that every
    rank takes the same number of steps (an uneven count would leave DDP waiting on the
    rank that stopped first), and rank r takes positions r, r + W, r + 2W, ... Every rank
    derives the same global order from (seed, epoch), so no order is ever sent over the wire.
    """
    if world_size == 1:
        return order
    total = shard_size(len(order), world_size) * world_size
    padded = order.repeat(math.ceil(total / len(order)))[:total]
    return padded[rank:total:world_size]


# Replicas ----------------------------------------------------------------------------------

@dataclass
class Replicas:
    """How this process takes part in training: its rank, its device, and what happens to
    BatchNorm statistics at each epoch's end. The default is one process on the CPU."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None  # None: no process group (run without torchrun)
    sync_bn: bool = False
    recalibrate_bn: bool = False
    timeout_s: float = DEFAULT_DIST_TIMEOUT_S
    epochs: list[dict] = field(default_factory=list)  # what end_epoch measured, epoch by epoch
    recalibration: dict | None = None
    fingerprints: list[str] = field(default_factory=list)  # sha256 of each rank's BN buffers at the end
    sync_bn_layers: dict[str, str] = field(default_factory=dict)  # trained as SyncBatchNorm, exported as this class
    _sync_originals: dict[str, type] = field(default_factory=dict, repr=False)  # while converted: the classes to restore

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # data

    def shard(self, order: torch.Tensor) -> torch.Tensor:
        return shard_order(order, rank=self.rank, world_size=self.world_size)

    def shard_size(self, num_samples: int) -> int:
        return shard_size(num_samples, self.world_size)

    def augment_seed(self, seed: int) -> int:
        return seed + RANK_SEED_STRIDE * self.rank

    # collectives: tensors travel through the backend's device and come back to the CPU

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(tensor, dist.ReduceOp.SUM)

    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(tensor, dist.ReduceOp.MAX)

    def _all_reduce(self, tensor: torch.Tensor, op) -> torch.Tensor:
        if not self.distributed:
            return tensor
        travelling = tensor.to(self.device, copy=True)
        dist.all_reduce(travelling, op=op)
        return travelling.cpu()

    def gather(self, value: object) -> list:
        if not self.distributed:
            return [value]
        values: list = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def together(self, run: Callable[[], T], *, main_only: bool = False) -> T | None:
        """Run ``run()`` (on rank 0 only, with ``main_only``); if it raises a BnexportError on
        any rank, every rank raises it, so that none is left waiting for the others."""
        error = None
        result = None
        if self.is_main or not main_only:
            try:
                result = run()
            except BnexportError as err:
                error = str(err)
        errors = self.gather(error)
        failed = [(rank, message) for rank, message in enumerate(errors) if message]
        if failed:
            rank, message = failed[0]
            prefix = f"rank {rank}: " if self.distributed and rank != 0 else ""
            raise SharedError(prefix + message) if self.distributed else BnexportError(message)
        return result

    def check_same(self, what: str, value: dict) -> None:
        """Every rank must have been started with the same ``value`` (arguments, data)."""
        values = self.gather(value)
        for rank, theirs in enumerate(values):
            if theirs != values[0]:
                key = next((k for k in sorted(set(values[0]) | set(theirs)) if values[0].get(k) != theirs.get(k)), "?")
                raise SharedError(f"inconsistent {what} across ranks: rank {rank} has {key}={theirs.get(key)!r}, "
                                  f"rank 0 has {values[0].get(key)!r}; start every rank with the same arguments")

    # training

    @contextmanager
    def parallel(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[nn.Module]:
        """The module to train: ``model`` on this device, wrapped in DDP under torchrun.

        On exit the model is plain BatchNorm again, back on the CPU, with its optimizer state.
        """
        if not self.distributed and self.device.type == "cpu":
            yield model
            return
        originals = to_sync_batchnorm(model) if self.sync_bn and self.distributed else {}
        self._sync_originals = originals
        self.sync_bn_layers = {name: f"{cls.__name__} -> {type(model.get_submodule(name)).__name__}"
                               for name, cls in originals.items()}
        model.to(self.device)
        reseat_optimizer(optimizer)
        try:
            if self.distributed:
                # forward_sync_buffers=False: each replica keeps statistics of its own shard, which
                # end_epoch pools; the default would overwrite them with rank 0's before every step.
                # (DDP still syncs buffers once at construction; they are equal then anyway.)
                yield nn.parallel.DistributedDataParallel(
                    model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                    **NO_FORWARD_BUFFER_SYNC)
            else:
                yield model
        finally:
            from_sync_batchnorm(model, originals)
            for name, cls in originals.items():
                if type(model.get_submodule(name)) is not cls:
                    raise RuntimeError(f"{name} did not turn back into {cls.__name__}")
                self.sync_bn_layers[name] += " -> " + cls.__name__
            model.to("cpu")
            reseat_optimizer(optimizer)

    def mean_losses(self, losses: list[float]) -> list[float]:
        """Each step's loss averaged over the ranks: the loss of the global batch."""
        if not self.distributed or not losses:
            return losses
        total = self.sum(torch.tensor(losses, dtype=torch.float64))
        return (total / self.world_size).tolist()

    def end_epoch(self, model: nn.Module, losses: list[float], *, epoch: int, final: bool,
                  train_images: torch.Tensor, batch_size: int) -> list[float]:
        """Average the losses, pool the BN statistics and, at the end with ``recalibrate_bn``,
        recompute them exactly; returns the losses to record."""
        losses = self.mean_losses(losses)
        if batchnorm_layers(model) and self.distributed:
            spread = self.merge_over_ranks(model, batch_size=batch_size, input_shape=tuple(train_images.shape[1:]))
            self.epochs.append({"epoch": epoch + 1, "spread_before_merge": spread})
        if final and self.recalibrate_bn and batchnorm_layers(model):
            self.recalibration = self.recompute_over_ranks(model, train_images, batch_size=batch_size).to_json()
        if final and self.distributed:
            self.fingerprints = self.check_identical(model)
        return losses

    def merge_over_ranks(self, model: nn.Module, *, batch_size: int, input_shape: tuple[int, ...]) -> dict[str, dict]:
        """Pool every BN layer's running statistics over the ranks; returns the spread before.

        Each rank's (running_mean, running_var) is read as the mean and unbiased variance of
        one full batch on that rank: m = batch_size × values per sample per channel, the m
        behind PyTorch's m/(m − 1) correction. The pooled running_var is then exactly what
        SyncBatchNorm computes for the global batch from its ranks' batch statistics.
        """
        per_sample = values_per_sample(model, input_shape)
        spreads = {}
        for name, layer in batchnorm_layers(model).items():
            mean = layer.running_mean.detach().cpu().double()
            var = layer.running_var.detach().cpu().double()
            count = float(batch_size * per_sample[name])
            pooled = pool(Moments.from_running(mean, var, count), sum_over=self.sum)
            pooled_var = pooled.unbiased_var()
            extremes = self.max(torch.stack([mean, var, -mean, -var]))
            rank0_mean = self._from_rank0(mean)
            spreads[name] = layer_spread(extremes[0], -extremes[2], extremes[1], -extremes[3],
                                         pooled.mean, pooled_var, rank0_mean).to_json()
            with torch.no_grad():
                layer.running_mean.copy_(pooled.mean)
                layer.running_var.copy_(pooled_var)
                # all ranks step in lockstep, so their counts agree; max makes sure
                layer.num_batches_tracked.copy_(self.max(layer.num_batches_tracked.detach().cpu()))
        return spreads

    def recompute_over_ranks(self, model: nn.Module, train_images: torch.Tensor, *, batch_size: int):
        """Exact statistics over the whole training set: rank r takes samples r, r + W, ...
        (no padding, so each sample counts once), and the moments are pooled over ranks."""
        mine = torch.arange(self.rank, len(train_images), self.world_size)
        # Plain BatchNorm for the pass: SyncBatchNorm would all-reduce inside every forward,
        # and ranks may hold one batch more or less than each other here.
        originals = self._sync_originals
        from_sync_batchnorm(model, originals)
        try:
            return recompute_running_stats(model, training_batches(train_images, mine, batch_size=batch_size), sum_over=self.sum)
        finally:
            if originals:
                to_sync_batchnorm(model)

    def check_identical(self, model: nn.Module) -> list[str]:
        """Every rank's BN buffers and weights hashed and compared; returns the hashes by rank."""
        digests = self.gather(state_fingerprint(model))
        if len(set(digests)) != 1:
            raise RuntimeError(f"replicas disagree after the BatchNorm merge: {digests}")
        return digests

    def _from_rank0(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.distributed:
            return tensor
        travelling = tensor.to(self.device, copy=True)
        dist.broadcast(travelling, src=0)
        return travelling.cpu()

    def to_json(self) -> dict:
        return {
            "world_size": self.world_size,
            "backend": self.backend,
            "device": str(self.device),
            "sync_bn": self.sync_bn and self.distributed,
            "sync_bn_layers": self.sync_bn_layers,
            "bn_statistics": "recalibrated" if self.recalibrate_bn else ("merged" if self.distributed else "local"),
            "epochs": self.epochs,
            "recalibration": self.recalibration,
            "bn_fingerprints": self.fingerprints,
        }


def state_fingerprint(model: nn.Module) -> str:
    """sha256 over every BN buffer and weight, in name order: equal means bit-identical."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def reseat_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Move optimizer state to its parameters' device, by PyTorch's own casting rules.

    ``load_state_dict`` casts each state tensor to its parameter's device and keeps Adam's
    ``step`` counter where it belongs, so a state dict round trip is the move.
    """
    if optimizer.state:
        optimizer.load_state_dict(optimizer.state_dict())


def to_sync_batchnorm(model: nn.Module) -> dict[str, type]:
    """Convert BN layers to nn.SyncBatchNorm in place; returns each one's original class."""
    originals = {name: type(m) for name, m in model.named_modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.SyncBatchNorm)}
    if "" in originals:
        raise ValueError("the model itself is a BatchNorm layer; wrap it before converting")
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert converted is model
    return originals


def from_sync_batchnorm(model: nn.Module, originals: dict[str, type]) -> None:
    """Turn the SyncBatchNorm layers back into their original classes, keeping the very same
    parameter objects (the optimizer holds them) and buffers."""
    for name, cls in originals.items():
        sync = model.get_submodule(name)
        plain = cls(sync.num_features, eps=sync.eps, momentum=sync.momentum, affine=sync.affine,
                    track_running_stats=sync.track_running_stats)
        if sync.affine:
            plain.weight, plain.bias = sync.weight, sync.bias
        if sync.track_running_stats:
            plain.running_mean, plain.running_var = sync.running_mean, sync.running_var
            plain.num_batches_tracked = sync.num_batches_tracked
        plain.train(sync.training)
        model.set_submodule(name, plain)


# The process group -------------------------------------------------------------------------

MISMATCH_GRACE_S = 10  # how long a rank that found a world-size mismatch waits for its peer to see it too


def _join(launch: Launch, timeout: timedelta, env: Mapping[str, str]):
    """torchrun's env:// rendezvous, then a check that every rank was told the same world size.

    Without the check, ranks with different WORLD_SIZE values wait for each other until the
    timeout; with it, they stop at once and say why.
    """
    store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
    store.set_timeout(timeout)
    check = dist.PrefixStore(f"bnexport/world_size/{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    check.set(str(rank), str(world_size))
    for other in range(world_size):  # rank 0 first: it exists whenever the store does
        if other == rank:
            continue
        try:
            check.wait([str(other)], timeout)
        except Exception:  # DistStoreError on timeout
            raise DistributedFailure(f"rank {rank}: rank {other} of WORLD_SIZE={world_size} did not join within "
                                     f"{timeout.total_seconds():g}s; was every process started?") from None
        theirs = int(check.get(str(other)))
        if theirs != world_size:
            # Say so, and wait briefly until the other side has read our value too: the rank that
            # hosts the store must not exit first, or its peer sees a closed connection instead.
            check.set(f"seen/{rank}", "1")
            try:
                check.wait([f"seen/{other}"], timedelta(seconds=MISMATCH_GRACE_S))
            except Exception:  # noqa: BLE001 - the peer may be gone already; our message stands
                pass
            raise BnexportError(f"inconsistent world size: rank {other} was started with WORLD_SIZE={theirs}, "
                                f"rank {rank} with WORLD_SIZE={world_size}; give every node the same "
                                f"--nnodes and --nproc_per_node")
    return store


COMMUNICATION_WORDS = ("connection", "timed out", "timeout", "gloo", "nccl", "processgroup", "broken pipe",
                       "socket", "peer")


def is_communication_failure(err: BaseException) -> bool:
    """An error from talking to the other ranks, as opposed to a bug in this one."""
    if isinstance(err, dist.DistError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(word in text for word in COMMUNICATION_WORDS)


def _first_line(err: BaseException) -> str:
    return re.sub(r"^\[[^\]]*\]\s*", "", first_line(err))  # drop gloo's source location


@contextmanager
def process_group(*, device: str = "auto", sync_bn: bool = False, recalibrate_bn: bool = False,
                  timeout_s: float = DEFAULT_DIST_TIMEOUT_S, env: Mapping[str, str] | None = None) -> Iterator[Replicas]:
    """Join torchrun's process group for the ``with`` block, or run as one process without it.

    Every collective waits at most ``timeout_s``; a dead or silent peer becomes a
    ``DistributedFailure`` instead of a hang.
    """
    env = os.environ if env is None else env
    launch = Launch.from_env(env)
    target = resolve_device(device, local_rank=launch.local_rank if launch else 0)
    if sync_bn and target.type != "cuda":
        raise BnexportError(
            "--sync-bn needs CUDA (DDP accepts SyncBatchNorm only on GPU modules) and this run is on the CPU; "
            "drop --sync-bn: on the CPU bnexport pools the ranks' BatchNorm statistics by all-reduce after every "
            "epoch (mean of means, variance by the law of total variance), or add --recalibrate-bn for exact ones")
    if not timeout_s > 0:
        raise BnexportError(f"--dist-timeout must be a positive number of seconds, got {timeout_s}")
    if launch is None:
        yield Replicas(device=target, sync_bn=sync_bn, recalibrate_bn=recalibrate_bn, timeout_s=timeout_s)
        return

    backend = BACKENDS[target.type]
    timeout = timedelta(seconds=timeout_s)
    if target.type == "cuda":
        torch.cuda.set_device(target)
    try:
        store = _join(launch, timeout, env)
        dist.init_process_group(backend, store=store, rank=launch.rank, world_size=launch.world_size, timeout=timeout,
                                device_id=target if target.type == "cuda" else None)
    except BnexportError:
        raise
    except Exception as err:
        raise DistributedFailure(f"rank {launch.rank}: could not join the {launch.world_size}-process group at "
                                 f"{env.get('MASTER_ADDR')}:{env.get('MASTER_PORT')} ({_first_line(err)})") from None
    replicas = Replicas(rank=launch.rank, world_size=launch.world_size, local_rank=launch.local_rank, device=target,
                        backend=backend, sync_bn=sync_bn, recalibrate_bn=recalibrate_bn, timeout_s=timeout_s)
    started = time.monotonic()
    healthy = False
    try:
        yield replicas
        healthy = True
    except BnexportError:
        healthy = True  # every rank raised it together; the group itself is fine
        raise
    except Exception as err:
        if not is_communication_failure(err):
            raise
        raise DistributedFailure(
            f"rank {launch.rank}: lost contact with the other ranks {time.monotonic() - started:.0f}s into the run: "
            f"a peer died or did not answer within --dist-timeout {timeout_s:g}s ({_first_line(err)})") from None
    finally:
        if healthy or backend == "gloo":  # NCCL may block on a broken group; exiting frees it
            dist.destroy_process_group()

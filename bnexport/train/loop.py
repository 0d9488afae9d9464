"""Training: one epoch, evaluation, the whole run, and checkpoints.

Adam and cross-entropy, as in the article. Batches are slices of in-memory tensors in an
order that depends only on (seed, epoch), so a resumed run is step-for-step the run that
was never interrupted, and the same seed gives the same checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from ..artifacts import atomic_path, library_versions
from ..config import TrainConfig
from ..data import Dataset, load_for_config, epoch_generator, epoch_order, random_shift
from ..distributed.process_group import Replicas
from ..errors import BnexportError, first_line
from ..model import ModelSpec, build_model

CHECKPOINT_FORMAT = 1
CHECKPOINT_KEYS = ("format", "state_dict", "optimizer", "config", "model_spec", "epoch", "history", "versions")


@dataclass
class History:
    """What training produced, step by step and epoch by epoch; saved as history.json."""

    step_loss: list[float] = field(default_factory=list)
    epoch_end_step: list[int] = field(default_factory=list)  # cumulative step count at each epoch's end
    test_accuracy: list[float] = field(default_factory=list)  # after each epoch
    # No wall-clock times here: they would make two runs with one seed differ. summary.json has them.

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "History":
        return cls(**{k: list(data.get(k, [])) for k in cls.__dataclass_fields__})


StepHook = Callable[[nn.Module, int], None]  # (model, global step) after each optimizer step


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    order: torch.Tensor,
    batch_size: int,
    max_steps: int | None = None,
    shift: int = 0,
    generator: torch.Generator | None = None,
    lr_for_step: Callable[[int], float] | None = None,
    progress: tqdm | None = None,
    on_step: StepHook | None = None,
    first_step: int = 0,
) -> list[float]:
    """One pass over ``order``; returns the loss of every step."""
    model.train()
    criterion = nn.CrossEntropyLoss()
    device = next(model.parameters()).device  # batches are cut and shifted on the CPU, then moved
    losses: list[float] = []
    for start in range(0, len(order), batch_size):
        if max_steps is not None and len(losses) >= max_steps:
            break
        index = order[start:start + batch_size]
        batch = images[index]
        if shift:
            batch = random_shift(batch, shift, generator=generator)
        batch = batch.to(device)
        if lr_for_step is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr_for_step(first_step + len(losses))
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(batch), labels[index].to(device))
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(model, first_step + len(losses))
        if progress is not None:
            progress.update(1)
            if len(losses) % 10 == 1:
                progress.set_postfix_str(f"loss {losses[-1]:.4f}", refresh=False)
    return losses


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 1000) -> float:
    """Top-1 accuracy in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(labels), batch_size):
        logits = model(images[start:start + batch_size].to(device))
        correct += int((logits.argmax(1).cpu() == labels[start:start + batch_size]).sum())
    return correct / max(1, len(labels))


def steps_per_epoch(num_samples: int, config: TrainConfig) -> int:
    """Steps in one epoch of ``num_samples`` (one rank's shard under torchrun)."""
    steps = -(-num_samples // config.batch_size)
    return min(steps, config.max_steps) if config.max_steps else steps


def total_steps(config: TrainConfig, dataset: Dataset, *, replicas: Replicas | None = None) -> int:
    """Optimizer steps in the whole run; under torchrun, those of one rank's shard (``replicas``
    decides the shard). The learning-rate schedule spans them, and a recorder spaces its probes over them."""
    samples = len(dataset.train_labels)
    if replicas is not None:
        samples = replicas.shard_size(samples)
    return config.epochs * steps_per_epoch(samples, config)


def learning_rate(config: TrainConfig, step: int, total_steps: int) -> float:
    """The rate at a global step: constant, or cosine-annealed from ``lr`` towards 0 over the run.

    A function of the step alone, so a resumed run continues the same curve.
    """
    if config.schedule == "constant":
        return config.lr
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))


@dataclass
class TrainState:
    """A model mid-run: what a checkpoint stores and ``--resume`` restores."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    spec: ModelSpec
    config: TrainConfig
    epoch: int = 0  # epochs completed
    history: History = field(default_factory=History)


def new_state(config: TrainConfig, dataset: Dataset) -> TrainState:
    spec = ModelSpec.for_images(dataset.image_shape, num_classes=dataset.num_classes, batch_norm=config.batch_norm)
    model = build_model(spec, seed=config.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    return TrainState(model, optimizer, spec, config)


def train(
    state: TrainState,
    dataset: Dataset,
    *,
    progress: bool = True,
    on_step: StepHook | None = None,
    on_epoch_end: Callable[[TrainState], None] | None = None,
    replicas: Replicas | None = None,
) -> TrainState:
    """Train ``state`` from its completed epoch up to ``state.config.epochs``.

    ``replicas`` (``bnexport.distributed.process_group``) says which shard of each epoch this process
    trains on, wraps the model for DDP, and pools BatchNorm statistics at each epoch's end.
    The default, one process on the CPU, is the plain loop.
    """
    config = state.config
    replicas = replicas or Replicas()
    images, labels = dataset.train_images, dataset.train_labels
    run_steps = total_steps(config, dataset, replicas=replicas)
    epoch_steps = run_steps // config.epochs  # every epoch takes as many
    with replicas.parallel(state.model, state.optimizer) as net:
        for epoch in range(state.epoch, config.epochs):
            order = replicas.shard(epoch_order(len(labels), seed=config.seed, epoch=epoch))
            with tqdm(total=epoch_steps, desc=f"epoch {epoch + 1}/{config.epochs}",
                      unit="step", disable=None if progress else True, leave=False, dynamic_ncols=True) as bar:
                losses = train_one_epoch(
                    net, state.optimizer, images, labels,
                    order=order, batch_size=config.batch_size, max_steps=config.max_steps,
                    shift=config.shift, generator=epoch_generator(seed=replicas.augment_seed(config.seed + 1), epoch=epoch),
                    lr_for_step=lambda step: learning_rate(config, step, run_steps),
                    progress=bar, on_step=on_step, first_step=len(state.history.step_loss),
                )
            losses = replicas.end_epoch(state.model, losses, epoch=epoch, final=epoch + 1 == config.epochs,
                                        train_images=images, batch_size=config.batch_size)
            accuracy = evaluate(state.model, dataset.test_images, dataset.test_labels)
            history = state.history
            history.step_loss.extend(losses)
            history.epoch_end_step.append(len(history.step_loss))
            history.test_accuracy.append(accuracy)
            state.epoch = epoch + 1
            if progress:
                tqdm.write(f"epoch {state.epoch}/{config.epochs}: loss {sum(losses) / max(1, len(losses)):.4f}, "
                           f"test accuracy {accuracy:.2%}")
            if on_epoch_end is not None:
                on_epoch_end(state)
    state.model.eval()
    return state


# Checkpoints ----------------------------------------------------------------------------

def checkpoint_payload(state: TrainState) -> dict:
    return {
        "format": CHECKPOINT_FORMAT,
        "state_dict": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "config": state.config.to_json(),
        "model_spec": state.spec.to_json(),
        "epoch": state.epoch,
        "history": state.history.to_json(),
        "versions": library_versions(),
    }


def save_checkpoint(state: TrainState, path: str | Path) -> Path:
    return save_payload(checkpoint_payload(state), path)


def save_payload(payload: dict, path: str | Path) -> Path:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        # A file object, not a path: torch.save names the archive's folder after a path,
        # and the temporary name would make two identical runs write different bytes.
        torch.save(payload, handle)
    return Path(path)


def load_checkpoint(path: str | Path) -> dict:
    """Read a bnexport checkpoint safely (``weights_only=True``) and check its structure."""
    path = Path(path)
    if not path.is_file():
        raise BnexportError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # zip, pickle and unpickler errors all mean "not a checkpoint we can read"
        raise BnexportError(f"{path}: not a readable checkpoint ({first_line(err)})") from None
    if not isinstance(payload, dict) or any(key not in payload for key in CHECKPOINT_KEYS):
        raise BnexportError(f"{path}: not a bnexport checkpoint (missing {', '.join(k for k in CHECKPOINT_KEYS if not isinstance(payload, dict) or k not in payload)})")
    return payload


def model_from_checkpoint(payload: dict, *, path: str | Path = "checkpoint") -> tuple[nn.Module, ModelSpec]:
    """Rebuild the eval-mode model a checkpoint describes."""
    try:
        spec = ModelSpec(**payload["model_spec"])
        model = build_model(spec)
        model.load_state_dict(payload["state_dict"])
    except (TypeError, RuntimeError, ValueError) as err:
        raise BnexportError(f"{path}: weights do not match the model it describes ({first_line(err)})") from None
    return model.eval(), spec


@dataclass
class ReopenedRun:
    """A checkpoint with its model rebuilt and its own dataset loaded again."""

    payload: dict
    model: nn.Module
    spec: ModelSpec
    config: TrainConfig
    dataset: Dataset


def reopen_checkpoint(path: str | Path) -> ReopenedRun:
    """Load a checkpoint, rebuild its eval-mode model and reload the data it was trained on
    (never downloading), refusing a dataset whose images no longer fit the model."""
    payload = load_checkpoint(path)
    model, spec = model_from_checkpoint(payload, path=path)
    config = TrainConfig.from_json(payload["config"])
    dataset = load_for_config(config, download=False)
    if tuple(dataset.image_shape) != spec.input_shape:
        raise BnexportError(f"{path}: its model takes {list(spec.input_shape)} images, but its dataset "
                            f"{config.dataset} gives {list(dataset.image_shape)}")
    return ReopenedRun(payload, model, spec, config, dataset)


def resume_state(payload: dict, config: TrainConfig, dataset: Dataset, *, path: str | Path) -> TrainState:
    """A TrainState restored from a checkpoint, after checking that it fits this run."""
    saved = TrainConfig.from_json(payload["config"])
    for name in ("dataset", "batch_norm", "seed", "batch_size", "lr", "schedule", "shift"):
        if getattr(saved, name) != getattr(config, name):
            raise BnexportError(
                f"--resume {path}: checkpoint was trained with {name}={getattr(saved, name)!r}, "
                f"this run asks for {getattr(config, name)!r}"
            )
    state = new_state(config, dataset)
    if ModelSpec(**payload["model_spec"]) != state.spec:
        raise BnexportError(f"--resume {path}: checkpoint's model {payload['model_spec']} does not fit dataset {dataset.name} {list(dataset.image_shape)}")
    state.model, _ = model_from_checkpoint(payload, path=path)
    state.optimizer = torch.optim.Adam(state.model.parameters(), lr=config.lr)
    try:
        state.optimizer.load_state_dict(payload["optimizer"])
    except (ValueError, KeyError) as err:
        raise BnexportError(f"--resume {path}: optimizer state does not fit the model ({err})") from None
    state.epoch = int(payload["epoch"])
    state.history = History.from_json(payload["history"])
    return state

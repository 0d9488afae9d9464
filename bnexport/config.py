"""The single home of bnexport's defaults: seed, tolerances, artifact names and run settings."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

DEFAULT_SEED = 0

DATASETS = ("bundled", "mnist", "fashion-mnist", "cifar10", "synthetic")

# Parity passes when max|a - ref| <= ATOL + RTOL * max|ref|. The scale term keeps the
# check meaningful for nets whose logits are large (random weights give outputs ~1e3).
DEFAULT_ATOL = 1e-5
DEFAULT_RTOL = 1e-4

# The seeded parity batch drawn from the test split.
PARITY_BATCH_SIZE = 64

# A check input's dynamic dims, where the model leaves them open and no --input-shape is
# given (``bnexport.parity.inputs.guessed_dim`` has the rule): sizes a real input would have.
GUESSED_BATCH = 1
GUESSED_CHANNELS = 3  # a dynamic channel dim of an image input
GUESSED_IMAGE_SIDE = 224  # height and width of a 4-D image input (ImageNet)
GUESSED_CLIP_FRAMES, GUESSED_CLIP_SIDE = 16, 112  # depth, height and width of a 5-D video input (r3d, x3d, slow_r50)
GUESSED_LENGTH = 128  # any other dynamic dim: tokens, samples, features

# The models a command takes besides files: ``bnexport.model_spec.load_model`` builds them.
SPEC_FORMS = "torchvision:NAME, timm:NAME, package.module:callable, path/to/file.py:callable or a bnexport checkpoint"

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
DEFAULT_OPSET = 18

DEFAULT_OUT_DIR = Path("artifacts")

SCHEDULES = ("cosine", "constant")  # the learning rate over a run: annealed to 0 per step, or fixed

DEVICES = ("auto", "cpu", "cuda")
# Under torchrun, how long a rank waits for the others in any collective before it stops:
# a dead or silent peer ends the run with an error instead of a hang.
DEFAULT_DIST_TIMEOUT_S = 300.0

# `bench`: each runner is called BENCH_WARMUP times untimed, then timed until it has made at
# least BENCH_MIN_RUNS calls and spent at least BENCH_MIN_SECONDS, at each batch size.
BENCH_BATCHES = (1, 64)
BENCH_WARMUP = 3
BENCH_MIN_RUNS = 10
BENCH_MIN_SECONDS = 0.5

# `export`: the samples pushed through a user's model for the report's activation figures, and
# the quick timing of BatchNorm kept against folded that the report's summary shows.
FIGURE_SAMPLES = 8
SUMMARY_BENCH_RUNS = 5
SUMMARY_BENCH_SECONDS = 0.3
FOLD_TABLE_ROWS = 30  # past this many BatchNorms, the terminal lists the kept ones only; fold.json has every one

# `view`: Netron's own default port, for the first model; the others take the next ones.
NETRON_PORT = 8080

# `visualize`: the figure formats matplotlib writes for the report, the first the default.
FIGURE_FORMATS = ("png", "svg")
DEFAULT_FIGURE_FORMAT = FIGURE_FORMATS[0]


@dataclass(frozen=True)
class ArtifactNames:
    """File names inside the output folder; one definition for the CLI, the report and the tests."""

    checkpoint: str = "checkpoint.pt"
    history: str = "history.json"
    torchscript: str = "model.ts"
    torchscript_folded: str = "model.folded.ts"
    exported_program: str = "model.pt2"
    exported_program_folded: str = "model.folded.pt2"
    onnx: str = "model.onnx"
    onnx_folded: str = "model.folded.onnx"
    parity: str = "parity.json"
    fold_report: str = "fold.json"
    summary: str = "summary.json"
    manifest: str = "manifest.json"
    bn_stats: str = "bn_stats.json"  # batch vs running BN statistics, step by step
    training_curves: str = "training_curves.json"  # loss and accuracy of the run and its BN/no-BN twin
    parity_outputs: str = "parity_outputs.npz"  # every runner's raw output on the parity batch
    figures: str = "figures"  # folder of the visualize command's figures
    report: str = "report.html"


ARTIFACTS = ArtifactNames()


@dataclass
class TrainConfig:
    """Everything that decides a training run. Saved in every checkpoint."""

    dataset: str = "bundled"  # bundled | mnist | fashion-mnist | cifar10 | synthetic
    data_root: str = "data"  # where torchvision datasets live
    download: bool = False  # the only switch that allows network access
    epochs: int = 5
    batch_size: int = 64  # as in the article
    lr: float = 3e-3  # Adam's peak learning rate; the article used 1e-3 with no schedule
    schedule: str = SCHEDULES[0]  # cosine: anneal to 0 over the run, per step | constant
    shift: int = 2  # random translation of up to this many pixels; 0 turns augmentation off
    seed: int = DEFAULT_SEED
    batch_norm: bool = True  # False builds the --no-bn variant
    max_steps: int | None = None  # cap steps per epoch; for quick tests
    synthetic_shape: tuple[int, int, int] = (1, 28, 28)  # C, H, W of --dataset synthetic
    synthetic_size: int = 2048
    device: str = "auto"  # auto: CUDA when present | cpu | cuda
    sync_bn: bool = False  # CUDA under torchrun: train with nn.SyncBatchNorm, export plain BatchNorm
    recalibrate_bn: bool = False  # recompute BN statistics exactly over the training set at the end

    def to_json(self) -> dict:
        data = asdict(self)
        data["synthetic_shape"] = list(self.synthetic_shape)
        return data

    @classmethod
    def from_json(cls, data: dict) -> "TrainConfig":
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in data.items() if k in known}
        if "synthetic_shape" in values:
            values["synthetic_shape"] = tuple(values["synthetic_shape"])
        return cls(**values)


@dataclass(frozen=True)
class Tolerance:
    atol: float = DEFAULT_ATOL
    rtol: float = DEFAULT_RTOL


DEFAULT_TOLERANCE = Tolerance()

# Machine epsilon of each floating dtype a model may compute in (bfloat16 has no numpy dtype of its own).
MACHINE_EPSILON = {"float64": 2.0**-52, "float32": 2.0**-23, "float16": 2.0**-10, "bfloat16": 2.0**-7}


def tolerance_for(dtype_name: str, *, base: Tolerance = DEFAULT_TOLERANCE) -> Tolerance:
    """The check's tolerance for a model computing in ``dtype_name`` ("float16", "bfloat16", ...).

    float32 and float64 keep ``base``. A coarser dtype rounds every weight and every
    intermediate, so a folded model differs from the unfolded one by a few units of its own
    epsilon ε per layer, relative to the output's scale: rtol = max(base.rtol, 10·ε),
    atol = max(base.atol, ε). That is 9.8e-3 of scale for float16 and 7.8e-2 for bfloat16.
    Integer and bool dtypes keep ``base``.

    Measured on float16 conversions (onnxconverter-common) of torchvision's resnet18, resnet50,
    efficientnet_b0 and mobilenet_v3_large with trained-like BN statistics, over five seeds:
    the folded model's largest error is 2.7e-4 to 6.9e-4 of scale (about one float16 unit in
    the last place of the largest output), 14× to 33× inside 10·ε. A wrong fold errs by 1e-2
    or more. bfloat16 keeps the same rule unmeasured: ONNX Runtime's CPU has no bfloat16 Conv
    or Gemm kernel to run such a model.
    """
    eps = MACHINE_EPSILON.get(str(dtype_name))
    if eps is None or eps <= MACHINE_EPSILON["float32"]:
        return base
    return Tolerance(atol=max(base.atol, eps), rtol=max(base.rtol, 10 * eps))

__all__ = [
    "ARTIFACTS",
    "BENCH_BATCHES",
    "BENCH_MIN_RUNS",
    "BENCH_MIN_SECONDS",
    "BENCH_WARMUP",
    "DATASETS",
    "DEFAULT_ATOL",
    "DEFAULT_DIST_TIMEOUT_S",
    "DEFAULT_FIGURE_FORMAT",
    "DEFAULT_OPSET",
    "DEFAULT_OUT_DIR",
    "DEFAULT_RTOL",
    "DEFAULT_SEED",
    "DEFAULT_TOLERANCE",
    "DEVICES",
    "FIGURE_FORMATS",
    "FIGURE_SAMPLES",
    "FOLD_TABLE_ROWS",
    "GUESSED_BATCH",
    "GUESSED_CHANNELS",
    "GUESSED_CLIP_FRAMES",
    "GUESSED_CLIP_SIDE",
    "GUESSED_IMAGE_SIDE",
    "GUESSED_LENGTH",
    "INPUT_NAME",
    "MACHINE_EPSILON",
    "NETRON_PORT",
    "OUTPUT_NAME",
    "PARITY_BATCH_SIZE",
    "SCHEDULES",
    "SPEC_FORMS",
    "SUMMARY_BENCH_RUNS",
    "SUMMARY_BENCH_SECONDS",
    "TrainConfig",
    "Tolerance",
    "tolerance_for",
]

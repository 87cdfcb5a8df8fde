"""The coverage matrix's options, rows, targets, thresholds and known failing cells."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from deploykit.errors import UserError
from deploykit.stages import CALIBRATION_METHODS

BACKENDS = ("onnxruntime", "openvino", "torch", "tensorrt")
PRECISIONS = ("fp32", "int8")
# Acceptance thresholds (issue: architecture and convolution coverage).
FP32_MIN_COSINE = 0.9999
INT8_MIN_COSINE = 0.99
DEFAULT_MAX_ACCURACY_DROP = 1.0
# A random-weight network that amplifies input perturbations more than this (median over
# the inputs of relative output error / relative input error) is chaotic: INT8 rounding at
# every layer is amplified beyond what any trained network does, so 8-bit logits cannot
# follow FP32. Measured (500 inputs): trained networks 0.5x (LeNet-5) to 1.85x
# (Fashion-MNIST SqueezeNet); the threshold is twice the largest. Random BatchNorm networks:
# ResNet basic 3.8x, ResNeXt 4.3x, DPN 4.4x, Xception 5.7x, ShuffleNet v2 6.5x, ResNet
# bottleneck 7.8x, MobileNet v3 17x, MobileNet v2 59x; single random blocks < 0.5x.
CHAOTIC_GAIN = 4.0
Step = Callable[[str], None]


@dataclass(frozen=True)
class KnownIssue:
    """A cell known to fail, with the cause and a minimal reproduction.

    Attributes:
        model: Catalogue name of the row.
        target: ``backend/precision`` of the cell.
        reason: The cause (a named backend bug, or a measured limitation), and how to
            reproduce it in a few lines.
    """

    model: str
    target: str
    reason: str


_G8_REASON = (
    "min-max INT8 ranges: on this random-weight ShuffleNet v1 (g=8; noise gain 2.9x, above "
    "the trained networks' 1.85x) min-max calibration on 256 images gives logits cosine "
    "0.985 on both runtimes from the same Q/DQ model, so not a backend bug; percentile "
    "calibration, which clips the range tails, gives 0.9933 (onnxruntime) / 0.9890 "
    "(openvino). Reproduce: deploykit coverage shufflenet_v1_g8_small "
    "[--calib-method percentile]"
)


# Cells expected to fail, with the reason and how to reproduce; each has a strict xfail test.
KNOWN_ISSUES: tuple[KnownIssue, ...] = (
    KnownIssue("shufflenet_v1_g8_small", "onnxruntime/int8", _G8_REASON),
    KnownIssue("shufflenet_v1_g8_small", "openvino/int8", _G8_REASON),
)


def known_issue(model: str, target: str) -> KnownIssue | None:
    """The recorded backend bug of a cell, if any."""
    return next((k for k in KNOWN_ISSUES if k.model == model and k.target == target), None)


@dataclass
class CoverageOptions:
    """What the coverage run covers and how hard it looks.

    Attributes:
        models: Catalogue names to run instead of the zoo's coverage rows.
        full: Run the rows' full-size models at their own input size (the benchmark matrix).
        backends: Target backends (unavailable ones get an ``unavailable`` column).
        precisions: Precisions per backend (a backend that lacks one shows ``n/a``).
        input_size: Input size override for every row, (height, width).
        fidelity_samples: Inputs compared with PyTorch on random-weight rows.
        eval_samples: Labelled inputs for top-1 accuracy on rows with trained weights.
        calib_samples: INT8 calibration inputs (the whole shipped natural-images-calib set:
            with 32 the ranges miss outliers of held-out images, e.g. the shuffled grouped
            block's INT8 cosine is 0.958 with 32 and 0.9993 with 256).
        calib_method: minmax, entropy, percentile or mse.
        bn_samples: Images for BatchNorm re-estimation of random-weight rows.
        bn_recalibrate: Re-estimate BatchNorm statistics of random-weight rows.
        latency_runs: Timed runs per cell (a few: this is coverage, not a benchmark).
        jobs: Rows run at once, each in its own worker process.
        threads: Threads of every runtime and of PyTorch; None = all usable cores. The
            default is 1: a coverage run shares CI machines, where oversubscribed
            multi-threaded runtimes slow down tenfold, and its latency is indicative only.
        max_accuracy_drop: Largest INT8 top-1 drop (points) on trained rows.
        seed: Seed of random weights and inputs.
        keep: Keep each row's artifacts (ONNX, fused, Q/DQ, backend builds) under this
            folder, one sub-folder per row; None = a temporary folder, removed.
    """

    models: list[str] | None = None
    full: bool = False
    backends: tuple[str, ...] = BACKENDS
    precisions: tuple[str, ...] = PRECISIONS
    input_size: tuple[int, int] | None = None
    fidelity_samples: int = 16
    eval_samples: int = 500
    calib_samples: int = 256
    calib_method: str = "minmax"
    bn_samples: int = 64
    bn_recalibrate: bool = True
    latency_runs: int = 5
    jobs: int = 1
    threads: int | None = 1
    max_accuracy_drop: float = DEFAULT_MAX_ACCURACY_DROP
    seed: int = 0
    keep: str | None = None

    def validate(self) -> None:
        """Raise UserError for options that cannot work."""
        from deploykit.backends.registry import get_backend

        for name in self.backends:
            get_backend(name)  # unknown names raise with a suggestion
        bad = [p for p in self.precisions if p not in PRECISIONS]
        if bad:
            raise UserError(f"unknown precision {bad[0]!r}: choose {' or '.join(PRECISIONS)}")
        for label, value in (
            ("--fidelity-samples", self.fidelity_samples),
            ("--calib-samples", self.calib_samples),
            ("--latency-runs", self.latency_runs),
            ("--eval-samples", self.eval_samples),
        ):
            if value < 1:
                raise UserError(f"{label} must be at least 1, got {value}")
        if self.calib_method not in CALIBRATION_METHODS:
            raise UserError(
                f"unknown calibration method {self.calib_method!r}: choose "
                f"{', '.join(CALIBRATION_METHODS)}"
            )
        if self.jobs < 1:
            raise UserError(f"--jobs must be at least 1, got {self.jobs}")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"--threads must be at least 1, got {self.threads}")
        if self.bn_samples < 2:
            raise UserError(f"--bn-samples must be at least 2, got {self.bn_samples}")


@dataclass(frozen=True)
class Row:
    """One row to run: what the reader sees and the catalogue model behind it."""

    name: str
    family: str
    kind: str
    model: str


@dataclass
class Target:
    backend: str
    precision: str
    available: bool
    reason: str
    encoding: str | None = None

    @property
    def key(self) -> str:
        return f"{self.backend}/{self.precision}"

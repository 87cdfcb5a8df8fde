"""Accuracy of a compiled artifact on a labelled or unlabelled set, next to FP32.

For every input the artifact and the FP32 reference (the PyTorch model, or ONNX
Runtime on the source ONNX file) both run; the result holds top-1/top-5 accuracy
of each where labels exist, the drop in points, and agreement with FP32 (top-1
agreement, top-5 overlap, cosine) always.

Top-1 agreement is also given on the *decisive* inputs alone: those whose
reference puts at least `DECISIVE_MARGIN` more softmax probability on its best
class than on its second. An INT8 model can flip an input whose top two classes
the reference all but ties without being any worse on the rest (EfficientNet-Lite0:
all 9 ONNX Runtime / OpenVINO disagreements on the 256 natural-image views, and
13 of 15 on 1,024 fresh views, lie below this margin; see docs/accuracy.md), so
the two figures side by side tell a near-tie flip from a real error. The gates use
the plain figure.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from deploykit.harness.datasets import Dataset
from deploykit.harness.fidelity import compare_outputs, top5_overlaps
from deploykit.harness.intervals import evaluation_intervals, interval_text, resampled_groups

Infer = Callable[[np.ndarray], np.ndarray]

# Lead (softmax probability of the best class minus the second's) that makes an input decisive.
DECISIVE_MARGIN = 0.05


@dataclass(frozen=True)
class Evaluation:
    """One artifact on one set.

    Attributes:
        dataset: Set name or source.
        samples: Inputs evaluated.
        labelled: True when accuracy against labels was measured.
        top1: Top-1 accuracy of the artifact, percent (labelled sets).
        top5: Top-5 accuracy of the artifact, percent.
        fp32_top1: Top-1 accuracy of the FP32 reference, percent.
        fp32_top5: Top-5 accuracy of the FP32 reference, percent.
        drop: ``fp32_top1 - top1`` in points (positive = the artifact is worse).
        top1_agreement: Percent of inputs whose top-1 class matches FP32's.
        top5_overlap: Mean percent of FP32's top-5 classes found in the artifact's top-5.
        cosine_min: Smallest per-input cosine similarity of the outputs.
        cosine_mean: Mean per-input cosine similarity.
        reference: What the FP32 reference was.
        data: The set's description (manifest, sha256, licence).
        seconds: Wall time of the evaluation.
        stability: The artifact against itself with each input moved by one grey level
            (`deploykit.harness.stability`), when it was measured.
        decisive_samples: Inputs whose reference leads by at least `DECISIVE_MARGIN`
            (None for outputs with fewer than two classes).
        decisive_agreement: Top-1 agreement on those inputs, percent (None when there
            are none).
        intervals: 95% confidence interval ``[lo, hi]`` of each figure by name
            (`deploykit.harness.intervals`).
        interval_groups: For sets of augmented views, the number of source photos the
            intervals resample (views of one photo are not independent draws); None
            when the inputs are independent.
    """

    dataset: str
    samples: int
    labelled: bool
    top1: float | None
    top5: float | None
    fp32_top1: float | None
    fp32_top5: float | None
    drop: float | None
    top1_agreement: float
    top5_overlap: float
    cosine_min: float
    cosine_mean: float
    reference: str
    data: dict[str, Any]
    seconds: float
    stability: dict[str, Any] | None = None
    decisive_samples: int | None = None
    decisive_agreement: float | None = None
    intervals: dict[str, list[float]] | None = None
    interval_groups: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return asdict(self)

    def summary(self) -> str:
        """One line for the terminal."""
        parts = [f"{self.dataset} ({self.samples})"]
        if self.labelled and self.top1 is not None:
            parts.append(
                f"top-1 {self.top1:.2f}% vs fp32 {self.fp32_top1:.2f}% "
                f"(drop {self.drop:+.2f} pt), top-5 {self.top5:.2f}% vs {self.fp32_top5:.2f}%"
            )
        parts.append(
            f"agreement top-1 {self.top1_agreement:.1f}%"
            f"{decisive_note(self.decisive_samples, self.decisive_agreement, self.samples)}, "
            f"top-5 overlap {self.top5_overlap:.1f}%"
            f"{interval_text(self.intervals, self.interval_groups)}"
        )
        if self.stability:
            parts.append(
                f"one-grey-level stability top-1 {self.stability['top1_agreement']:.1f}%, "
                f"top-5 overlap {self.stability['top5_overlap']:.1f}%"
            )
        return ", ".join(parts)


def decisive_note(
    count: int | None, agreement: float | None, samples: int, reference: str = "the reference"
) -> str:
    """`` (100.0% on the 218 where fp32 leads by ≥ 0.05)``, or nothing when every input is
    decisive or the figure is missing (results written before it existed)."""
    if count is None or agreement is None or count >= samples:
        return ""
    return f" ({agreement:.1f}% on the {count} where {reference} leads by ≥ {DECISIVE_MARGIN:g})"


def run_batched(infer: Infer, inputs: np.ndarray, batch: int) -> np.ndarray:
    """Run `infer` over `inputs` in chunks of `batch`, padding the last chunk if needed.

    A static-batch artifact only takes exactly `batch` inputs, so a short last
    chunk is padded with copies of its first input and the padding dropped.
    """
    outputs = []
    for start in range(0, inputs.shape[0], batch):
        chunk = inputs[start : start + batch]
        short = batch - chunk.shape[0]
        if short:
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], short, axis=0)])
        out = np.asarray(infer(np.ascontiguousarray(chunk)))
        outputs.append(out[: out.shape[0] - short] if short else out)
    return np.concatenate(outputs)


def decisive_mask(reference: np.ndarray, margin: float = DECISIVE_MARGIN) -> np.ndarray | None:
    """Per input: True when the reference's best class leads its second by `margin`.

    Rows that are already probabilities (non-negative, summing to 1) are used as
    they are; anything else is read as logits and put through a softmax. None for
    outputs with fewer than two classes.
    """
    ref = reference.reshape(reference.shape[0], -1).astype(np.float64)
    if ref.shape[1] < 2:
        return None
    if not (np.all(ref >= 0) and np.allclose(ref.sum(axis=1), 1.0, atol=1e-3)):
        from deploykit.runtime.model import softmax

        ref = softmax(ref)
    top2 = np.sort(ref, axis=1)[:, -2:]
    return np.asarray((top2[:, 1] - top2[:, 0]) >= margin)


def top1_matches(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Per input: True when the candidate's top-1 class is the reference's."""
    ref = reference.reshape(reference.shape[0], -1)
    cand = candidate.reshape(candidate.shape[0], -1)
    return np.asarray(ref.argmax(axis=1) == cand.argmax(axis=1))


def decisive_agreement(
    reference: np.ndarray, candidate: np.ndarray, margin: float = DECISIVE_MARGIN
) -> tuple[int | None, float | None]:
    """Top-1 agreement on the inputs whose reference leads its runner-up by `margin`.

    Returns:
        (decisive inputs, agreement on them in percent); (None, None) for outputs
        with fewer than two classes, (0, None) when no input is decisive.
    """
    return _decisive_figures(decisive_mask(reference, margin), top1_matches(reference, candidate))


def _decisive_figures(
    decisive: np.ndarray | None, agree: np.ndarray
) -> tuple[int | None, float | None]:
    if decisive is None:
        return None, None
    count = int(decisive.sum())
    if not count:
        return 0, None
    return count, float(100.0 * agree[decisive].mean())


def topk_hits(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Per input: True when its label is among the `k` largest logits."""
    flat = logits.reshape(logits.shape[0], -1)
    k = min(k, flat.shape[1])
    top = np.argpartition(-flat, k - 1, axis=1)[:, :k]
    return np.asarray((top == np.asarray(labels)[:, None]).any(axis=1))


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Percent of rows whose label is among the `k` largest logits."""
    return float(100.0 * np.mean(topk_hits(logits, labels, k)))


def evaluate_outputs(
    outputs: np.ndarray,
    reference: np.ndarray,
    data: Dataset,
    reference_label: str,
    seconds: float = 0.0,
) -> Evaluation:
    """Score artifact outputs against FP32 outputs and, where known, the labels."""
    fid = compare_outputs(reference, outputs)
    samples = int(outputs.shape[0])
    top1 = top5 = ref1 = ref5 = drop = None
    hits = None
    if data.labels is not None:
        labels = np.asarray(data.labels)
        hits = {
            "top1": topk_hits(outputs, labels, 1),
            "top5": topk_hits(outputs, labels, 5),
            "fp32_top1": topk_hits(reference, labels, 1),
            "fp32_top5": topk_hits(reference, labels, 5),
        }
        top1, top5, ref1, ref5 = (float(100.0 * np.mean(h)) for h in hits.values())
        drop = ref1 - top1
    agree = top1_matches(reference, outputs)
    decisive_inputs = decisive_mask(reference)
    decisive, decisive_top1 = _decisive_figures(decisive_inputs, agree)
    groups = data.groups
    intervals = evaluation_intervals(
        samples, agree, top5_overlaps(reference, outputs), hits, decisive_inputs, groups
    )
    interval_groups = resampled_groups(groups)
    return Evaluation(
        dataset=data.source,
        samples=samples,
        labelled=data.labels is not None,
        top1=top1,
        top5=top5,
        fp32_top1=ref1,
        fp32_top5=ref5,
        drop=drop,
        top1_agreement=100.0 * fid.top1_agreement,
        top5_overlap=100.0 * fid.top5_overlap,
        cosine_min=fid.cosine,
        cosine_mean=fid.cosine_mean,
        reference=reference_label,
        data=data.describe(),
        seconds=round(seconds, 3),
        decisive_samples=decisive,
        decisive_agreement=decisive_top1,
        intervals=intervals,
        interval_groups=interval_groups,
    )


def evaluate(
    infer: Infer,
    data: Dataset,
    batch: int,
    reference_outputs: np.ndarray,
    reference_label: str,
) -> Evaluation:
    """Run the artifact on `data` and score it against the reference's outputs and the labels.

    Args:
        infer: The artifact's runner (``Runner.infer``).
        data: The set.
        batch: Batch the artifact takes.
        reference_outputs: The reference's outputs on ``data.inputs`` (computed once by
            the caller: the accuracy gate scores several candidates against them).
        reference_label: What the reference is, for the report.
    """
    started = time.perf_counter()
    outputs = run_batched(infer, data.inputs, batch)
    return evaluate_outputs(
        outputs, reference_outputs, data, reference_label, time.perf_counter() - started
    )

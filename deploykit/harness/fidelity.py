"""Scale-aware comparison of two models' outputs on the same inputs.

Absolute tolerances fail on models whose logits are huge (random-weight
inception_v3 reaches ~1e12) and pass vacuously on models whose logits are tiny
(~1e-20), so the gate uses cosine similarity and error relative to the
reference's magnitude; the absolute error is reported too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Fidelity:
    """How closely a candidate's outputs follow the reference's.

    Attributes:
        cosine: Smallest per-sample cosine similarity.
        cosine_mean: Mean per-sample cosine similarity.
        max_abs_err: Largest absolute difference over all outputs.
        rel_err: ``max_abs_err`` divided by the largest absolute reference value.
        top1_agreement: Fraction of samples whose arg-max class agrees.
        top5_overlap: Mean fraction of the reference top-5 found in the candidate top-5.
        samples: Number of samples compared.
    """

    cosine: float
    cosine_mean: float
    max_abs_err: float
    rel_err: float
    top1_agreement: float
    top5_overlap: float
    samples: int

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return asdict(self)


def _cosines(ref: np.ndarray, cand: np.ndarray) -> np.ndarray:
    ref64 = ref.reshape(ref.shape[0], -1).astype(np.float64)
    cand64 = cand.reshape(cand.shape[0], -1).astype(np.float64)
    # Normalise each row first so 1e12 and 1e-20 logits are compared alike.
    ref_scale = np.abs(ref64).max(axis=1, keepdims=True)
    cand_scale = np.abs(cand64).max(axis=1, keepdims=True)
    ref_n = ref64 / np.where(ref_scale > 0, ref_scale, 1.0)
    cand_n = cand64 / np.where(cand_scale > 0, cand_scale, 1.0)
    dot = (ref_n * cand_n).sum(axis=1)
    norms = np.linalg.norm(ref_n, axis=1) * np.linalg.norm(cand_n, axis=1)
    both_zero = (np.linalg.norm(ref_n, axis=1) == 0) & (np.linalg.norm(cand_n, axis=1) == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(norms > 0, dot / norms, 0.0)
    return np.where(both_zero, 1.0, cos)


def top5_overlaps(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Per sample: the fraction of the reference's top-5 classes in the candidate's top-5."""
    ref2 = reference.reshape(reference.shape[0], -1)
    cand2 = candidate.reshape(candidate.shape[0], -1)
    k = min(5, ref2.shape[1])
    ref_top = np.argsort(-ref2, axis=1)[:, :k]
    cand_top = np.argsort(-cand2, axis=1)[:, :k]
    return np.array([len(set(r) & set(c)) / k for r, c in zip(ref_top, cand_top, strict=True)])


def compare_outputs(reference: np.ndarray, candidate: np.ndarray) -> Fidelity:
    """Compare batched outputs (first axis = samples) of a reference and a candidate.

    Raises:
        ValueError: When the shapes differ.
    """
    if reference.shape != candidate.shape:
        raise ValueError(f"output shapes differ: {reference.shape} vs {candidate.shape}")
    if reference.shape[0] == 0:
        raise ValueError("no samples to compare")
    cos = _cosines(reference, candidate)
    diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
    max_abs = float(np.nan_to_num(diff.max(), nan=np.inf))
    scale = float(np.abs(reference).max())
    rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    ref2 = reference.reshape(reference.shape[0], -1)
    cand2 = candidate.reshape(candidate.shape[0], -1)
    top1 = float(np.mean(ref2.argmax(axis=1) == cand2.argmax(axis=1)))
    overlap = float(np.mean(top5_overlaps(reference, candidate)))
    return Fidelity(
        cosine=float(np.nan_to_num(cos.min(), nan=0.0)),
        cosine_mean=float(np.nan_to_num(cos.mean(), nan=0.0)),
        max_abs_err=max_abs,
        rel_err=float(rel),
        top1_agreement=top1,
        top5_overlap=overlap,
        samples=int(reference.shape[0]),
    )


@dataclass(frozen=True)
class Tolerance:
    """Fidelity gate: minimum cosine and maximum relative error."""

    min_cosine: float
    max_rel_err: float

    def violations(self, fidelity: Fidelity) -> list[str]:
        """Return human-readable reasons the gate fails (empty when it holds)."""
        reasons = []
        if not fidelity.cosine >= self.min_cosine:
            reasons.append(f"cosine {fidelity.cosine:.6f} < {self.min_cosine}")
        if not fidelity.rel_err <= self.max_rel_err:
            reasons.append(f"relative error {fidelity.rel_err:.3g} > {self.max_rel_err:g}")
        return reasons


# Export and fusion must be numerically the same graph.
EXACT = Tolerance(min_cosine=0.99999, max_rel_err=1e-3)
# Gate of a compiled artifact against the FP32 PyTorch model, per precision.
PRECISION_TOLERANCE: dict[str, Tolerance] = {
    "fp32": Tolerance(min_cosine=0.9999, max_rel_err=1e-2),
    "fp16": Tolerance(min_cosine=0.99, max_rel_err=0.25),
    "bf16": Tolerance(min_cosine=0.98, max_rel_err=0.5),
    # Logit fidelity of INT8 against FP32; accuracy on labelled data is judged separately.
    "int8": Tolerance(min_cosine=0.98, max_rel_err=0.5),
}

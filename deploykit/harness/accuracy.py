"""The accuracy gate of a run: real-data evaluation sets loaded once, judged per set."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deploykit.errors import UserError
from deploykit.harness.datasets import Dataset, load_eval_data
from deploykit.harness.evaluate import DECISIVE_MARGIN, evaluate, run_batched
from deploykit.harness.report import Gate
from deploykit.models.contract import InputContract

Infer = Callable[[np.ndarray], np.ndarray]


@dataclass
class AccuracyCheck:
    """Evaluation sets with their FP32 reference outputs, computed once and reused.

    The accuracy-aware fallback evaluates several candidate models; the sets and
    the reference outputs do not change between them.
    """

    sets: list[tuple[Dataset, np.ndarray]]
    reference_label: str
    batch: int
    budget: float
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    min_top5_overlap: float | None = None

    @classmethod
    def load(
        cls,
        names: list[str],
        contract: InputContract,
        samples: int | None,
        reference: Infer,
        reference_label: str,
        batch: int,
        budget: float,
        reference_batch: int | None = None,
        min_top5_overlap: float | None = None,
    ) -> AccuracyCheck:
        """Load each set and run the FP32 reference on it.

        Args:
            reference_batch: Batch for the reference when it takes any batch (PyTorch);
                default the artifact's batch.
            min_top5_overlap: Smallest top-5 overlap with the reference (percent) every
                set must keep; None = not gated.
        """
        sets = []
        for name in names:
            data = load_eval_data(name, contract, samples)
            sets.append((data, run_batched(reference, data.inputs, reference_batch or batch)))
        return cls(
            sets=sets,
            reference_label=reference_label,
            batch=batch,
            budget=budget,
            min_top5_overlap=min_top5_overlap,
        )

    def evaluate(self, infer: Infer) -> dict[str, dict[str, Any]]:
        """Evaluate a candidate on every set; the results also become :attr:`results`."""
        results = {}
        for data, reference in self.sets:
            evaluation = evaluate(infer, data, self.batch, reference, self.reference_label)
            results[evaluation.dataset] = evaluation.to_dict()
        self.results = results
        return results

    @property
    def labelled(self) -> bool:
        """True when some set has labels (only those are gated)."""
        return any(data.labels is not None for data, _ in self.sets)

    def worst_drop(self, results: dict[str, dict[str, Any]] | None = None) -> float | None:
        """The largest top-1 drop beyond each labelled set's budget, plus the budget.

        A value at or below :attr:`budget` means every labelled set meets its
        (resolution-aware) budget; None without labels.
        """
        excess = [
            r["drop"] - effective_budget(self.budget, int(r["samples"]))
            for r in (results or self.results).values()
            if r["drop"] is not None
        ]
        return max(excess) + self.budget if excess else None

    def overlap_shortfall(self, results: dict[str, dict[str, Any]] | None = None) -> float | None:
        """Points by which the worst set misses :attr:`min_top5_overlap` (<= 0: every set
        keeps it); None when the overlap is not gated."""
        if self.min_top5_overlap is None:
            return None
        overlaps = [r["top5_overlap"] for r in (results or self.results).values()]
        return self.min_top5_overlap - min(overlaps) if overlaps else None

    def met(self, results: dict[str, dict[str, Any]] | None = None) -> bool:
        """True when every set meets the drop budget and, if gated, the top-5 overlap."""
        drop = self.worst_drop(results)
        shortfall = self.overlap_shortfall(results)
        return (drop is None or drop <= self.budget + 1e-9) and (
            shortfall is None or shortfall <= 1e-9
        )

    def gates(self) -> list[Gate]:
        """One gate per labelled set, and one per set for a gated top-5 overlap."""
        gates = accuracy_gates(self.results, self.budget)
        if self.min_top5_overlap is not None:
            gates += overlap_gates(self.results, self.min_top5_overlap)
        return gates


def accuracy_gates(accuracy: dict[str, Any], budget: float, reference: str = "fp32") -> list[Gate]:
    """One gate per labelled set: top-1 drop against the reference within `budget` points."""
    gates = []
    for name, result in accuracy.items():
        if result.get("drop") is None:
            continue
        allowed = effective_budget(budget, int(result["samples"]))
        note = "" if allowed == budget else f"; one input of {result['samples']} is {allowed:g} pt"
        gates.append(
            Gate(
                name=f"accuracy:{name}",
                passed=result["drop"] <= allowed + 1e-9,
                detail=f"top-1 {result['top1']:.2f}% vs {reference} {result['fp32_top1']:.2f}% "
                f"(drop {result['drop']:+.2f} pt, budget {budget:g} pt{note})",
            )
        )
    return gates


def overlap_gates(
    accuracy: dict[str, Any], minimum: float, reference: str | None = None
) -> list[Gate]:
    """One gate per set: top-5 overlap with the reference of at least `minimum` percent."""
    return [
        Gate(
            name=f"top5_overlap:{name}",
            passed=result["top5_overlap"] >= minimum - 1e-9,
            detail=f"top-5 overlap with {reference or result.get('reference', 'fp32')} "
            f"{result['top5_overlap']:.2f}% (at least {minimum:g}%)",
        )
        for name, result in accuracy.items()
    ]


@dataclass(frozen=True)
class EvalGates:
    """Thresholds `deploykit eval` checks on one evaluation (None: not checked).

    Each compares the artifact with its reference: the FP32 model, or with
    ``--against`` another run's artifact (two backends' INT8 models of one
    calibration, say), so a CI job can hold either to a number.

    Attributes:
        min_agreement: Smallest top-1 agreement, percent. Like the drop budget, never
            stricter than one input of the set (`effective_budget`).
        min_top5_overlap: Smallest top-5 overlap, percent.
        min_cosine: Smallest mean cosine similarity of the outputs.
        max_accuracy_drop: Largest top-1 drop on the set's labels, points (labelled
            sets only).
    """

    min_agreement: float | None = None
    min_top5_overlap: float | None = None
    min_cosine: float | None = None
    max_accuracy_drop: float | None = None

    def validate(self) -> None:
        """Raise UserError for a threshold outside its range."""
        for flag, value in (
            ("--min-agreement", self.min_agreement),
            ("--min-top5-overlap", self.min_top5_overlap),
        ):
            if value is not None and not 0 < value <= 100:
                raise UserError(f"{flag} is a percentage in (0, 100], got {value:g}")
        if self.min_cosine is not None and not -1 <= self.min_cosine <= 1:
            raise UserError(f"--min-cosine is a cosine in [-1, 1], got {self.min_cosine:g}")
        if self.max_accuracy_drop is not None and self.max_accuracy_drop < 0:
            raise UserError(f"--max-accuracy-drop must be >= 0, got {self.max_accuracy_drop:g}")

    def check(self, result: dict[str, Any], reference: str) -> list[Gate]:
        """The gates on one evaluation (`Evaluation.to_dict()`), in a fixed order."""
        name, samples = result["dataset"], int(result["samples"])
        one = {name: result}
        gates = []
        if self.min_agreement is not None:
            budget = 100.0 - self.min_agreement
            allowed = effective_budget(budget, samples)
            note = "" if allowed == budget else f"; one input of {samples} allowed"
            detail = (
                f"top-1 agreement with {reference} {result['top1_agreement']:.2f}% "
                f"(at least {self.min_agreement:g}%{note})"
            )
            if result.get("decisive_samples"):
                detail += (
                    f"; {result['decisive_agreement']:.2f}% on the "
                    f"{result['decisive_samples']} where {reference} leads by >= "
                    f"{DECISIVE_MARGIN:g}"
                )
            steady = result.get("stability")
            if steady:
                detail += (
                    f"; the artifact against itself after one grey level "
                    f"{steady['top1_agreement']:.2f}% (worst draw "
                    f"{steady['top1_agreement_min']:.2f}%)"
                )
            gates.append(
                Gate(
                    name=f"agreement:{name}",
                    passed=100.0 - result["top1_agreement"] <= allowed + 1e-9,
                    detail=detail,
                )
            )
        if self.min_top5_overlap is not None:
            gates += overlap_gates(one, self.min_top5_overlap, reference)
        if self.min_cosine is not None:
            gates.append(
                Gate(
                    name=f"cosine:{name}",
                    passed=result["cosine_mean"] >= self.min_cosine,
                    detail=f"cosine with {reference}: mean {result['cosine_mean']:.5f} "
                    f"(at least {self.min_cosine:g}), smallest {result['cosine_min']:.5f}",
                )
            )
        if self.max_accuracy_drop is not None:
            gates += accuracy_gates(one, self.max_accuracy_drop, reference)
        return gates


def effective_budget(budget: float, samples: int) -> float:
    """The budget a set can resolve: never below one input's worth of top-1.

    On 20 labelled photos one image is 5 points, so a 1-point budget would forbid
    any change at all; such a set allows one input, and larger sets the budget.
    """
    return max(budget, 100.0 / samples) if samples else budget

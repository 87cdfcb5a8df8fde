"""Harness units: synthetic inputs, scale-aware fidelity, latency statistics, report schema."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from deploykit.fsutil import staged_dir, write_text_atomic
from deploykit.harness.fidelity import EXACT, PRECISION_TOLERANCE, compare_outputs
from deploykit.harness.inputs import synthetic_images
from deploykit.harness.latency import LatencyOptions, measure, stats_from_samples
from deploykit.harness.report import SCHEMA_VERSION, Report, load_report
from deploykit.models.contract import InputContract


def test_synthetic_images_are_deterministic_and_normalised() -> None:
    contract = InputContract(height=40, width=56)
    a = synthetic_images(contract, 4, seed=1)
    b = synthetic_images(contract, 4, seed=1)
    c = synthetic_images(contract, 4, seed=2)
    assert a.shape == (4, 3, 40, 56) and a.dtype == np.float32 and a.flags.c_contiguous
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # Normalised with ImageNet mean/std: roughly zero-centred, within the [0,1] image range.
    assert a.min() > -2.2 and a.max() < 2.7
    assert abs(float(a.mean())) < 1.0


@pytest.mark.parametrize("scale", [1e-20, 1.0, 1e12])
def test_fidelity_is_scale_aware(scale: float) -> None:
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(16, 1000)) * scale
    close = ref * (1 + 1e-7 * rng.normal(size=ref.shape))
    fid = compare_outputs(ref, close)
    assert fid.cosine > 0.999999 and fid.rel_err < 1e-5
    assert fid.top1_agreement == 1.0 and fid.top5_overlap == 1.0
    assert not EXACT.violations(fid)
    # A real error is caught at every scale, not only where absolute errors are large.
    wrong = ref + 0.5 * scale * rng.normal(size=ref.shape)
    bad = compare_outputs(ref, wrong)
    assert EXACT.violations(bad) and PRECISION_TOLERANCE["fp32"].violations(bad)


def test_fidelity_reports_agreement_and_worst_sample() -> None:
    ref = np.eye(4, 10, dtype=np.float32) * 5 + 0.1
    cand = ref.copy()
    cand[0] = cand[0][::-1]  # one sample with a different arg-max
    fid = compare_outputs(ref, cand)
    assert fid.top1_agreement == pytest.approx(0.75)
    assert fid.cosine < fid.cosine_mean <= 1.0
    assert fid.samples == 4
    with pytest.raises(ValueError, match="shapes differ"):
        compare_outputs(ref, cand[:, :5])


def test_fidelity_nan_output_fails_the_gate() -> None:
    ref = np.ones((2, 10), dtype=np.float32)
    cand = ref.copy()
    cand[1, 3] = np.nan
    assert PRECISION_TOLERANCE["fp32"].violations(compare_outputs(ref, cand))


def test_latency_statistics() -> None:
    samples = np.array([1.0, 2.0, 3.0, 4.0, 100.0]) / 1e3
    stats = stats_from_samples(samples, batch=4, threads=2, total_seconds=0.11)
    assert stats.p50_ms == pytest.approx(3.0)
    assert stats.min_ms == pytest.approx(1.0)
    assert stats.p99_ms > stats.p90_ms > stats.p50_ms
    assert stats.mean_ms == pytest.approx(22.0)
    assert stats.throughput_ips == pytest.approx(4 * 1e3 / 22.0)
    assert stats.runs == 5 and stats.threads == 2


def test_measure_warms_up_and_honours_runs_and_duration() -> None:
    calls: list[float] = []

    def call() -> None:
        calls.append(time.perf_counter())
        time.sleep(0.002)

    options = LatencyOptions(warmup_runs=3, warmup_seconds=0.0, runs=20, min_seconds=0.1)
    stats = measure(call, batch=1, threads=1, options=options)
    assert stats.runs >= 20
    assert len(calls) == stats.runs + 3
    assert stats.total_seconds >= 0.1
    assert 2.0 <= stats.p50_ms < 20.0  # sleep(2 ms) is at least 2 ms


def test_measure_stops_at_max_seconds() -> None:
    options = LatencyOptions(
        warmup_runs=0, warmup_seconds=0.0, runs=10_000, min_seconds=0.0, max_seconds=0.2
    )
    stats = measure(lambda: time.sleep(0.005), batch=1, threads=1, options=options)
    assert 10 <= stats.runs < 10_000
    assert stats.total_seconds < 1.0


def _report() -> Report:
    return Report(
        model="m",
        model_source={"kind": "catalogue"},
        target="onnxruntime",
        device={"kind": "cpu"},
        precision="fp32",
        weights="random",
        input={"height": 8},
        versions={"python": "3"},
        created="2026-01-01T00:00:00+00:00",
    )


def test_report_round_trip(tmp_path: Path) -> None:
    report = _report()
    report.save(tmp_path)
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["schema_version"] == SCHEMA_VERSION
    for key in ("model", "target", "precision", "weights", "versions", "stages", "status"):
        assert key in data
    assert load_report(tmp_path) == report


def test_load_report_errors_are_user_errors(tmp_path: Path) -> None:
    from deploykit.errors import UserError

    with pytest.raises(UserError, match=r"report\.json"):
        load_report(tmp_path)
    (tmp_path / "report.json").write_text("{not json")
    with pytest.raises(UserError, match=r"report\.json"):
        load_report(tmp_path)


def test_staged_dir_publishes_only_on_success(tmp_path: Path) -> None:
    final = tmp_path / "run"
    with pytest.raises(RuntimeError), staged_dir(final) as work:
        write_text_atomic(work / "half.txt", "x")
        raise RuntimeError("boom")
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []
    with staged_dir(final) as work:
        write_text_atomic(work / "done.txt", "ok")
    assert (final / "done.txt").read_text() == "ok"
    # A second run replaces the first completely.
    with staged_dir(final) as work:
        write_text_atomic(work / "other.txt", "ok")
    assert sorted(p.name for p in final.iterdir()) == ["other.txt"]


def test_staged_dir_removes_folders_it_created_on_failure(tmp_path: Path) -> None:
    (tmp_path / "keep").mkdir()
    with pytest.raises(ValueError), staged_dir(tmp_path / "keep" / "a" / "b" / "run"):
        raise ValueError
    assert [p.name for p in tmp_path.rglob("*")] == ["keep"]


def _busy(ms: float) -> None:
    end = time.perf_counter() + ms / 1e3
    while time.perf_counter() < end:
        pass


def test_alternating_measurement_swaps_the_order_each_pair() -> None:
    from deploykit.harness.latency import measure_alternating

    calls: list[str] = []

    def a() -> None:
        calls.append("a")
        _busy(2.0)

    def b() -> None:
        calls.append("b")
        _busy(1.0)

    a_ms, b_ms = measure_alternating(a, b, blocks=3, pairs=4, warmup_pairs=1)
    assert calls == ["a", "b"] + ["a", "b", "b", "a"] * 6
    assert len(a_ms) == len(b_ms) == 3
    ratios = sorted(x / y for x, y in zip(a_ms, b_ms, strict=True))
    assert 1.5 < ratios[1] < 2.5, (a_ms, b_ms)  # the median block: a preempted one may differ


class _BusyRunner:
    """A runner whose inference is a fixed busy wait; records when it is loaded."""

    def __init__(self, name: str, ms: float, log: list[str]) -> None:
        self.name, self.ms, self.log = name, ms, log

    def activate(self) -> None:
        self.log.append(self.name)

    def deactivate(self) -> None:
        pass

    def prepare(self, batch: object) -> None:
        pass

    def run_prepared(self) -> None:
        _busy(self.ms)


def test_paired_ratio_loads_both_orders_and_resolves_a_small_difference() -> None:
    from deploykit.harness.compare import CompareOptions, _paired

    log: list[str] = []
    options = CompareOptions(models=[], rounds=4, runs=20)
    slow, fast = _BusyRunner("slow", 1.1, log), _BusyRunner("fast", 1.0, log)
    result = _paired(slow, fast, None, options)  # type: ignore[arg-type]
    assert log == ["slow", "fast", "fast", "slow"]  # each loaded first once
    assert result["blocks"] == 8 and result["pairs_per_block"] == 20
    assert result["low"] <= result["ratio"] <= result["high"]
    assert result["low"] > 1.03 and result["high"] < 1.2, result  # 10% slower, 1 excluded


def test_compare_refuses_a_pair_outside_its_targets() -> None:
    from deploykit.errors import UserError
    from deploykit.harness.compare import CompareOptions, compare

    options = CompareOptions(
        models=["tinynets:tiny_net"], targets=["onnxruntime"], pairs=[("onnxruntime", "openvino")]
    )
    with pytest.raises(UserError, match="--pair onnxruntime,openvino"):
        compare(options)

"""`deploykit regress`: noise-aware verdicts, baseline files, CI outputs, and real measurements."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from deploykit import api
from deploykit.cli import main
from deploykit.errors import UserError
from deploykit.regress.baseline import Entry, EntryLatency, Measurements, load_measurements
from deploykit.regress.measure import MeasureOptions
from deploykit.regress.outputs import to_junit, to_markdown
from deploykit.regress.reliability import busy_delay
from deploykit.regress.verdict import (
    CheckOptions,
    judge,
    judge_entry,
    paired_ratio_interval,
    ratio_interval,
)

ENV = {"cpu": {"name": "Test CPU", "cores": 2, "features": ["avx2"]}, "versions": {"x": "1"}}


def _entry(rounds: list[float], ref: list[float] | None = None, **accuracy: float) -> Entry:
    ref = ref or [1.0] * len(rounds)
    return Entry(
        model="m",
        target="openvino",
        precision="fp32",
        batch=1,
        threads=2,
        latency=EntryLatency(
            p50_ms=sorted(rounds)[len(rounds) // 2],
            p90_ms=max(rounds),
            p99_ms=max(rounds),
            mean_ms=sum(rounds) / len(rounds),
            std_ms=0.1,
            runs=30 * len(rounds),
            round_p50s_ms=rounds,
            reference_round_p50s_ms=ref,
            round_p10s_ms=[v * 0.9 for v in rounds],
            round_mins_ms=[v * 0.8 for v in rounds],
            reference_round_p10s_ms=[v * 0.9 for v in ref],
        ),
        accuracy=dict(accuracy),
    )


def _set(entry: Entry, env: dict[str, Any] = ENV) -> Measurements:
    return Measurements(
        created="2026-01-01T00:00:00+00:00",
        environment=env,
        reference_workload="conv-gemm-v1",
        rounds=len(entry.latency.round_p50s_ms),
        entries={entry.key: entry},
    )


BASE = [10.0, 10.3, 9.8, 10.1, 9.9]


def test_identical_rounds_are_ok() -> None:
    verdict = judge_entry(_entry(BASE), _entry(BASE), CheckOptions(), normalised=False)
    assert verdict.verdict == "ok" and not verdict.regression
    assert verdict.ratio == pytest.approx(1.0)


def test_clear_slowdown_is_flagged() -> None:
    slow = [v * 1.2 for v in BASE]
    verdict = judge_entry(_entry(BASE), _entry(slow), CheckOptions(), normalised=False)
    assert verdict.verdict == "slower" and verdict.regression
    assert verdict.ratio == pytest.approx(1.2, rel=0.01)
    assert verdict.ci_low is not None and verdict.ci_low > 1.0


def test_slowdown_within_noise_is_inconclusive_not_a_regression() -> None:
    noisy = [8.0, 16.0, 12.5, 7.0, 15.0]  # median 12.5 (+25%) but rounds straddle the baseline
    verdict = judge_entry(_entry(BASE), _entry(noisy), CheckOptions(), normalised=False)
    assert verdict.verdict == "noisy" and not verdict.regression
    assert verdict.ci_low is not None and verdict.ci_low <= 1.0


def test_small_change_below_tolerance_is_ok() -> None:
    slightly = [v * 1.05 for v in BASE]
    assert judge_entry(_entry(BASE), _entry(slightly), CheckOptions(), False).verdict == "ok"


def test_faster() -> None:
    fast = [v * 0.7 for v in BASE]
    assert judge_entry(_entry(BASE), _entry(fast), CheckOptions(), False).verdict == "faster"


def test_too_few_rounds_cannot_be_a_regression() -> None:
    verdict = judge_entry(_entry([10.0]), _entry([20.0]), CheckOptions(), normalised=False)
    assert verdict.verdict == "noisy"
    assert any("rounds" in note for note in verdict.notes)


def test_accuracy_drop_is_a_regression() -> None:
    base = _entry(BASE, top1_agreement=1.0, fidelity_cosine=0.99999)
    cur = _entry(BASE, top1_agreement=0.97, fidelity_cosine=0.99999)
    verdict = judge_entry(base, cur, CheckOptions(accuracy_tolerance=1.0), normalised=False)
    assert verdict.verdict == "accuracy" and verdict.regression
    assert "top1_agreement" in verdict.accuracy[0]


def test_normalisation_cancels_a_uniformly_slower_machine() -> None:
    """On a machine 30% slower overall (reference too), normalised latencies are unchanged."""
    base = _entry(BASE, ref=[2.0] * 5)
    cur = _entry([v * 1.3 for v in BASE], ref=[2.6] * 5)
    other_cpu = {**ENV, "cpu": {**ENV["cpu"], "name": "Slower CPU"}}
    verdicts = judge(_set(base), _set(cur, other_cpu), CheckOptions(normalise="auto"))
    assert verdicts[0].normalised and verdicts[0].verdict == "ok"
    raw = judge(_set(base), _set(cur, other_cpu), CheckOptions(normalise="off"))
    assert raw[0].verdict == "slower"


def test_entry_missing_from_the_baseline_is_bad_input() -> None:
    other = _entry(BASE).model_copy(update={"model": "other"})
    with pytest.raises(UserError, match="not in the baseline"):
        judge(_set(_entry(BASE)), _set(other), CheckOptions())


# A machine whose load drifts from round to round: every round is slower or faster
# for both sides alike, and the candidate is 30% slower than the baseline in each.
DRIFT = [10.0, 20.0, 8.0, 26.0, 11.0, 22.0, 9.0, 28.0, 10.5, 16.0]


def test_pairing_cancels_per_round_drift_that_hides_a_slowdown_unpaired() -> None:
    slow = [v * 1.3 for v in DRIFT]
    unpaired = judge_entry(_entry(DRIFT), _entry(slow), CheckOptions(), normalised=False)
    paired = judge_entry(_entry(DRIFT), _entry(slow), CheckOptions(), normalised=False, paired=True)
    assert unpaired.verdict == "noisy" and unpaired.ci_low < 1.0
    assert paired.verdict == "slower" and paired.regression and paired.paired
    assert paired.ratio == pytest.approx(1.3) and paired.ci_low == pytest.approx(1.3)


def test_paired_unchanged_rerun_with_drift_is_ok() -> None:
    jitter = [1.0, 1.02, 0.98, 1.01, 0.99, 1.03, 0.97, 1.0, 1.02, 0.98]
    cur = [v * j for v, j in zip(DRIFT, jitter, strict=True)]
    verdict = judge_entry(_entry(DRIFT), _entry(cur), CheckOptions(), normalised=False, paired=True)
    assert verdict.verdict == "ok" and not verdict.regression
    assert verdict.ci_low < 1.0 < verdict.ci_high


def test_paired_interval_is_reproducible_and_needs_equal_rounds() -> None:
    slow = [v * 1.3 for v in DRIFT]
    assert paired_ratio_interval(DRIFT, slow) == paired_ratio_interval(DRIFT, slow)
    with pytest.raises(ValueError, match="differ in number"):
        paired_ratio_interval(DRIFT, slow[:-1])
    # Unequal rounds cannot be paired: judge_entry falls back to the unpaired interval.
    verdict = judge_entry(
        _entry(DRIFT), _entry(slow[:-1]), CheckOptions(), normalised=False, paired=True
    )
    assert (verdict.ratio, verdict.ci_low, verdict.ci_high) == ratio_interval(DRIFT, slow[:-1])


def test_ratio_interval_is_reproducible() -> None:
    slow = [v * 1.2 for v in BASE]
    assert ratio_interval(BASE, slow) == ratio_interval(BASE, slow)


def _write(path: Path, data: Any) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        ("{corrupt", "not valid JSON"),
        ({"kind": "deploykit-measurements", "schema_version": 99}, "schema_version 99"),
        ({"kind": "something-else", "schema_version": 1}, "kind 'something-else'"),
        ({"kind": "deploykit-measurements", "schema_version": 1, "entries": {}}, "not valid at"),
        ({"kind": "bench", "schema_version": 1}, "without round data"),
        ({"kind": "bench-compare", "schema_version": 1}, "compares several run folders"),
    ],
)
def test_bad_baselines_exit_2_with_one_line(content: Any, message: str, tmp_path: Path) -> None:
    baseline = tmp_path / "baseline.json"
    if content is not None:
        _write(baseline, content)
    current = _set(_entry(BASE))
    current.save(tmp_path / "current.json")
    with pytest.raises(UserError, match=message):
        load_measurements(baseline)
    result = CliRunner().invoke(
        main, ["regress", "-b", str(baseline), "-c", str(tmp_path / "current.json")]
    )
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr


def test_cli_exit_codes_markdown_and_junit(tmp_path: Path) -> None:
    baseline = tmp_path / "baseline.json"
    _set(_entry(BASE)).save(baseline)
    same = tmp_path / "same.json"
    _set(_entry(BASE)).save(same)
    slow = tmp_path / "slow.json"
    _set(_entry([v * 1.5 for v in BASE])).save(slow)
    ok = CliRunner().invoke(main, ["regress", "-b", str(baseline), "-c", str(same)])
    assert ok.exit_code == 0, ok.output
    assert "no regression" in ok.stdout

    md, junit = tmp_path / "summary.md", tmp_path / "junit.xml"
    bad = CliRunner().invoke(
        main,
        ["regress", "-b", str(baseline), "-c", str(slow), "--tolerance", "10%"]
        + ["--markdown", str(md), "--junit", str(junit), "--json"],
    )
    assert bad.exit_code == 1, bad.output
    result = json.loads(bad.stdout)
    assert result["regressions"] == 1 and result["verdicts"][0]["verdict"] == "slower"
    root = ET.parse(junit).getroot()
    suite = root.find("testsuite")
    assert suite is not None and suite.get("tests") == "1" and suite.get("failures") == "1"
    case = suite.find("testcase")
    assert case is not None and case.get("name") == "m/openvino-fp32@b1"
    assert case.find("failure") is not None
    text = md.read_text()
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert len(table) == 3 and len({line.count("|") for line in table}) == 1
    assert "slower" in table[2] and "1 regression" in text


def test_github_step_summary_is_appended(tmp_path: Path) -> None:
    baseline = tmp_path / "baseline.json"
    _set(_entry(BASE)).save(baseline)
    summary = _write(tmp_path / "summary.md", "earlier step\n")
    result = CliRunner().invoke(
        main,
        ["regress", "-b", str(baseline), "-c", str(baseline)],
        env={"GITHUB_STEP_SUMMARY": str(summary)},
    )
    assert result.exit_code == 0, result.output
    text = summary.read_text()
    assert text.startswith("earlier step\n") and "## deploykit regress" in text


def test_markdown_and_junit_render_noisy_entries() -> None:
    result = {
        "options": {"tolerance": 0.1},
        "rounds": 5,
        "normalised": False,
        "environment_differences": ["cpu name: a -> b"],
        "verdicts": [
            judge_entry(
                _entry(BASE), _entry([8.0, 16.0, 12.5, 7.0, 15.0]), CheckOptions(), False
            ).to_dict()
        ],
    }
    assert "noisy" in to_markdown(result) and "cpu name: a -> b" in to_markdown(result)
    suite = ET.fromstring(to_junit(result)).find("testsuite")
    assert suite is not None and suite.get("skipped") == "1" and suite.get("failures") == "0"


# --- real measurements -------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("regress")
    request = api.ExportRequest(
        model="squeezenet1_1",
        target="onnxruntime",
        input_size=(96, 96),
        runs=10,
        min_seconds=0.1,
        fidelity_samples=4,
        out=str(out),
    )
    return api.export(request).run_dir


@pytest.mark.onnxruntime
def test_real_rerun_passes_and_real_slowdown_is_caught(run_dir: Path, tmp_path: Path) -> None:
    # Mechanics, not statistics: a wide tolerance keeps this reliable on a loaded CI runner
    # (the false-alarm and detection rates at 10% are measured by deploykit.regress.reliability).
    baseline = tmp_path / "baseline.json"
    options = MeasureOptions(rounds=10, runs=10, min_seconds=0.15)
    check = CheckOptions(tolerance=0.25)
    recorded = api.regress(
        baseline, run_dirs=[run_dir], measure_options=options, update_baseline=True
    )
    assert recorded["updated"] == ["squeezenet1_1/onnxruntime-fp32@b1"]
    stored = load_measurements(baseline)
    entry = next(iter(stored.entries.values()))
    assert len(entry.latency.reference_round_p50s_ms) == len(entry.latency.round_p50s_ms)
    assert entry.accuracy["fidelity_cosine"] >= 0.9999

    assert len(entry.latency.round_p50s_ms) == 20  # the baseline measures twice the rounds

    again = api.regress(baseline, run_dirs=[run_dir], measure_options=options, check=check)
    assert again["regressions"] == 0, again["verdicts"]
    assert again["verdicts"][0]["paired"]

    delay_s = 1.0 * entry.latency.p50_ms / 1e3  # +100%: far beyond tolerance and noise
    slowed = api.regress(
        baseline, run_dirs=[run_dir], measure_options=options, check=check, wrap=busy_delay(delay_s)
    )
    assert slowed["verdicts"][0]["verdict"] == "slower", slowed["verdicts"]
    assert slowed["regressions"] == 1


@pytest.mark.onnxruntime
def test_bench_json_feeds_regress(run_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    bench = runner.invoke(
        main, ["bench", str(run_dir), "--runs", "30", "--min-seconds", "0.5", "--json"]
    )
    assert bench.exit_code == 0, bench.output
    data = json.loads(bench.stdout)
    assert data["latency"]["rounds"] == 5 and data["latency"]["runs"] >= 30
    current = _write(tmp_path / "current.json", bench.stdout)
    baseline = tmp_path / "baseline.json"
    update = runner.invoke(
        main, ["regress", "-b", str(baseline), "-c", str(current), "--update-baseline"]
    )
    assert update.exit_code == 0, update.output
    check = runner.invoke(main, ["regress", "-b", str(baseline), "-c", str(current), "--json"])
    assert check.exit_code == 0, check.output
    assert json.loads(check.stdout)["verdicts"][0]["ratio"] == pytest.approx(1.0)


@pytest.mark.onnxruntime
def test_stored_artifacts_are_paired_and_a_changed_one_is_not(
    run_dir: Path, tmp_path: Path
) -> None:
    baseline = tmp_path / "ci" / "baseline.json"
    baseline.parent.mkdir()
    options = MeasureOptions(rounds=3, runs=5, min_seconds=0.05)
    api.regress(
        baseline,
        run_dirs=[run_dir],
        measure_options=options,
        update_baseline=True,
        store_artifacts=True,
    )
    stored = load_measurements(baseline)
    entry = next(iter(stored.entries.values()))
    copy = baseline.parent / entry.run_dir
    assert entry.run_dir.startswith("baseline.json.artifacts/")
    assert (copy / "report.json").is_file() and (copy / "onnxruntime" / "model.onnx").is_file()
    assert not (copy / "model.onnx").exists()  # only what a later run needs

    paired = api.regress(baseline, run_dirs=[run_dir], measure_options=options)
    assert paired["verdicts"][0]["paired"]
    assert not api.regress(
        baseline, run_dirs=[run_dir], measure_options=options, check=CheckOptions(pair=False)
    )["verdicts"][0]["paired"]

    (copy / "onnxruntime" / "backend.json").write_text(
        (copy / "onnxruntime" / "backend.json").read_text() + " "
    )
    changed = api.regress(baseline, run_dirs=[run_dir], measure_options=options)
    verdict = changed["verdicts"][0]
    assert not verdict["paired"]
    assert any("changed since the baseline" in note for note in verdict["notes"])


@pytest.mark.onnxruntime
def test_bench_of_several_folders_gives_each_a_ratio_to_the_first(
    run_dir: Path, tmp_path: Path
) -> None:
    import shutil
    import time

    twin = tmp_path / "twin"
    shutil.copytree(run_dir, twin)
    delay_s = json.loads((run_dir / "report.json").read_text())["latency"]["p50_ms"] / 1e3

    def slow_second(key: str, call: Any) -> Any:
        if not key.startswith("2:"):
            return call

        def slowed() -> None:
            call()
            end = time.perf_counter() + delay_s  # the export's p50 again: about 2x
            while time.perf_counter() < end:
                pass

        return slowed

    result = api.bench_several(
        [run_dir, twin], runs=30, min_seconds=0.6, rounds=3, warmup=3, wrap=slow_second
    )
    first, second = result["entries"]
    print(f"ratios {first['ratio']:.3f} {second['ratio']:.3f} range {second['ratio_range']}")
    assert result["kind"] == "bench-compare" and result["rounds"] == 3
    assert first["ratio"] == 1.0 and first["run_dir"] == str(run_dir)
    assert len(second["round_p50s_ms"]) == 3 and second["runs"] >= 30
    # The export measured its p50 under other load: the added time is only about one p50.
    assert 1.4 < second["ratio"] < 6.0, second
    assert second["ratio_range"][0] > 1.2  # every round saw it, not only the median

    runner = CliRunner()
    shown = runner.invoke(
        main,
        ["bench", str(run_dir), str(twin), "--runs", "6", "--min-seconds", "0.1", "--rounds", "3"],
    )
    assert shown.exit_code == 0, shown.output
    assert "x first" in shown.stdout and "1.00x" in shown.stdout
    with pytest.raises(UserError, match="two or more run folders"):
        api.bench_several([run_dir])
    with pytest.raises(UserError, match="rounds of at least 3"):
        api.bench_several([run_dir, twin], rounds=2)
    report = json.loads((twin / "report.json").read_text())
    report["input"]["batch"] = 4
    (twin / "report.json").write_text(json.dumps(report))
    with pytest.raises(UserError, match=r"different batches \(1, 4\)"):
        api.bench_several([run_dir, twin])

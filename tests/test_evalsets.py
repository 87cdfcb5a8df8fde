"""Calibration/evaluation sets (manifests under calibration/), folder labels, and evaluation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from deploykit.cli import main
from deploykit.errors import UserError
from deploykit.harness import evalsets, fashion_mnist
from deploykit.harness.accuracy import EvalGates
from deploykit.harness.datasets import Dataset, load_dataset, load_eval_data
from deploykit.harness.display import accuracy_line
from deploykit.harness.evaluate import (
    decisive_agreement,
    evaluate_outputs,
    run_batched,
    topk_accuracy,
)
from deploykit.models.contract import InputContract

SMALL = InputContract(height=64, width=64, resize=72)
FMNIST = pytest.mark.skipif(
    not fashion_mnist.is_available(),
    reason="Debian's dataset-fashion-mnist is not installed (scripts/setup.sh installs it)",
)


def _origin_installed(manifest: evalsets.Manifest) -> bool:
    try:
        for origin in {f.origin for f in manifest.files}:
            evalsets.origin_root(origin)
    except UserError:
        return False
    return True


def test_shipped_manifests_are_valid_and_match_the_installed_files() -> None:
    manifests = evalsets.list_manifests()
    names = {m.name for m in manifests}
    assert {
        "imagenet-photos20",
        "natural-images",
        "natural-images-calib",
        "fashion-mnist-test",
        "fashion-mnist-train",
    } <= names
    checked = 0
    for manifest in manifests:
        assert manifest.licence and manifest.description
        assert manifest.to_json()["sha256"] == manifest.sha256
        if manifest.name.startswith("fashion") and not fashion_mnist.is_available():
            continue
        assert _origin_installed(manifest), manifest.name
        for source in manifest.files:
            evalsets.verified_path(source)  # raises on a changed file
            checked += 1
    assert checked >= 28


def test_calibration_and_evaluation_sets_never_share_a_source_file() -> None:
    manifests = {m.name: m for m in evalsets.list_manifests()}
    pairs = 0
    for manifest in manifests.values():
        for other_name in manifest.disjoint_from:
            other = manifests[other_name]
            assert {manifest.role, other.role} == {"calib", "eval"}
            mine = {(f.sha256, f.path) for f in manifest.files}
            theirs = {(f.sha256, f.path) for f in other.files}
            assert not {s for s, _ in mine} & {s for s, _ in theirs}, (manifest.name, other_name)
            pairs += 1
    assert pairs >= 4


def test_imagenet_photos_carry_their_labels() -> None:
    data = load_eval_data("imagenet-photos20", SMALL)
    assert data.inputs.shape == (20, 3, 64, 64)
    assert data.labels is not None and data.labels[:3] == [243, 559, 438]
    assert data.describe()["manifest"] == "imagenet-photos20"
    assert data.sha256 == evalsets.find_manifest("imagenet-photos20").sha256


def test_augmented_set_is_deterministic_and_subsets_are_stable() -> None:
    first = load_eval_data("natural-images", SMALL, count=24)
    again = load_eval_data("natural-images", SMALL, count=24)
    assert first.labels is None and first.inputs.shape == (24, 3, 64, 64)
    np.testing.assert_array_equal(first.inputs, again.inputs)
    # Views differ from each other (real augmentation, not copies).
    flat = first.inputs.reshape(24, -1)
    assert len({row.tobytes() for row in flat}) == 24
    calib = load_dataset("natural-images-calib", SMALL, 24)
    assert not np.allclose(calib.inputs, first.inputs)


def test_views_of_labelled_photos_keep_their_labels_and_their_photo() -> None:
    whole = load_eval_data("imagenet-photos20-views", SMALL)
    photos = evalsets.find_manifest("imagenet-photos20")
    assert whole.inputs.shape == (640, 3, 64, 64)
    assert whole.labels is not None and whole.groups is not None
    # 32 views per photo, in the manifest's order, each with its photo's class.
    expected = np.repeat([f.label for f in photos.files], 32)
    np.testing.assert_array_equal(whole.labels, expected)
    np.testing.assert_array_equal(whole.groups, np.repeat(np.arange(20), 32))
    # A subset keeps each view's photo and label: the groups match the inputs taken.
    part = load_eval_data("imagenet-photos20-views", SMALL, count=50)
    manifest = evalsets.find_manifest("imagenet-photos20-views")
    chosen = np.sort(np.random.default_rng(0).choice(640, size=50, replace=False))
    assert part.groups is not None and part.labels is not None
    np.testing.assert_array_equal(part.groups, chosen // 32)
    np.testing.assert_array_equal(part.labels, expected[chosen])
    np.testing.assert_array_equal(part.inputs, whole.inputs[chosen])
    np.testing.assert_array_equal(evalsets.source_groups(manifest, 50), part.groups)
    # Files and IDX sets have one input per source: no groups.
    assert load_eval_data("imagenet-photos20", SMALL).groups is None
    assert evalsets.source_groups(photos) is None


def test_a_changed_data_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = evalsets.find_manifest("imagenet-photos20")
    source = manifest.files[0]
    fake_root = tmp_path / "foolbox"
    (fake_root / "data").mkdir(parents=True)
    for f in manifest.files:
        shutil.copy(evalsets.origin_root(f.origin) / f.path, fake_root / f.path)
    (fake_root / source.path).write_bytes(b"not the photo")
    real = evalsets.origin_root
    monkeypatch.setattr(
        evalsets,
        "origin_root",
        lambda origin: fake_root if origin == "pypi:foolbox" else real(origin),
    )
    with pytest.raises(UserError, match=r"sha256 .* the manifest says"):
        load_eval_data("imagenet-photos20", SMALL)


def test_a_hand_edited_manifest_is_refused(tmp_path: Path) -> None:
    data = json.loads((evalsets.manifest_dir() / "imagenet-photos20.json").read_text())
    data["files"][0]["label"] = 1
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match="edited by hand"):
        evalsets.read_manifest(path)
    with pytest.raises(UserError, match="no dataset manifest 'nope'"):
        evalsets.find_manifest("nope")


def test_asking_for_more_inputs_than_a_set_holds_fails() -> None:
    with pytest.raises(UserError, match="holds 20 inputs, fewer than the 21"):
        load_dataset("imagenet-photos20", SMALL, 21)


@FMNIST
def test_fashion_mnist_sets_follow_the_official_split() -> None:
    gray = InputContract(
        channels=1, height=32, width=32, resize=32, mean=(0.5,), std=(0.5,), color="GRAY"
    )
    test = load_eval_data("fashion-mnist-test", gray, count=100)
    assert test.inputs.shape == (100, 1, 32, 32) and test.labels is not None
    assert set(test.labels) <= set(range(10))
    whole = evalsets.find_manifest("fashion-mnist-test")
    assert whole.size() == 10_000 and evalsets.find_manifest("fashion-mnist-train").size() == 60_000


def _write_image(path: Path, value: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((40, 40, 3), value, dtype=np.uint8)).save(path)


def test_folder_labels_from_a_labels_file_and_from_numeric_folders(tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    for i in range(3):
        _write_image(flat / f"img{i}.png", 40 * i)
    (flat / "labels.csv").write_text("# file,class\nimg0.png,7\nimg1.png,3\nimg2.png,999\n")
    data = load_eval_data(str(flat), SMALL)
    assert data.labels == [7, 3, 999]

    numeric = tmp_path / "numeric"
    _write_image(numeric / "281" / "a.png", 10)
    _write_image(numeric / "5" / "b.png", 20)
    assert sorted(load_eval_data(str(numeric), SMALL).labels or []) == [5, 281]

    (flat / "labels.csv").write_text("img0.png,7\n")
    with pytest.raises(UserError, match=r"has no label for img1\.png"):
        load_eval_data(str(flat), SMALL)
    (flat / "labels.csv").write_text("img0.png;seven\n")
    with pytest.raises(UserError, match=r"expected .relative/path,class-index."):
        load_eval_data(str(flat), SMALL)


def test_topk_accuracy_and_padding_of_the_last_batch() -> None:
    logits = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]], dtype=np.float32)
    labels = np.array([1, 2, 2])
    assert topk_accuracy(logits, labels, 1) == pytest.approx(200 / 3)
    assert topk_accuracy(logits, labels, 2) == pytest.approx(200 / 3)
    assert topk_accuracy(logits, labels, 3) == 100.0

    seen: list[int] = []

    def static_batch_of_4(x: np.ndarray) -> np.ndarray:
        assert x.shape[0] == 4
        seen.append(x.shape[0])
        return x.reshape(4, -1) * 2

    inputs = np.arange(10, dtype=np.float32).reshape(10, 1)
    out = run_batched(static_batch_of_4, inputs, 4)
    np.testing.assert_array_equal(out, inputs * 2)
    assert seen == [4, 4, 4]


def test_evaluation_reports_drop_and_agreement() -> None:
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(50, 10)).astype(np.float32)
    labels = reference.argmax(axis=1).tolist()
    candidate = reference.copy()
    candidate[:5] = -candidate[:5]  # five inputs flip their top-1
    data = Dataset(inputs=np.zeros((50, 1)), source="toy", sha256="x", labels=labels)
    result = evaluate_outputs(candidate, reference, data, "toy fp32")
    assert result.fp32_top1 == 100.0 and result.top1 == 90.0 and result.drop == 10.0
    assert result.top1_agreement == 90.0 and result.samples == 50
    unlabelled = evaluate_outputs(
        candidate, reference, Dataset(np.zeros((50, 1)), "toy", "x"), "toy"
    )
    assert unlabelled.top1 is None and unlabelled.drop is None
    assert unlabelled.top1_agreement == 90.0


def test_eval_gates_hold_each_figure_to_its_threshold() -> None:
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(50, 10)).astype(np.float32)
    labels = reference.argmax(axis=1).tolist()
    candidate = reference.copy()
    candidate[:5] = -candidate[:5]  # five of 50 flip: 90% agreement, a 10-point drop
    data = Dataset(inputs=np.zeros((50, 1)), source="toy", sha256="x", labels=labels)
    result = evaluate_outputs(candidate, reference, data, "toy fp32").to_dict()
    result["stability"] = {"top1_agreement": 92.5, "top1_agreement_min": 90.0}

    def verdict(gates: EvalGates) -> dict[str, bool]:
        return {g.name: g.passed for g in gates.check(result, "fp32")}

    assert verdict(EvalGates()) == {}
    assert verdict(EvalGates(min_agreement=90.0)) == {"agreement:toy": True}
    assert verdict(EvalGates(min_agreement=91.0)) == {"agreement:toy": False}
    # A set cannot resolve finer than one input: 99% of 50 inputs allows one (98%).
    assert verdict(EvalGates(min_agreement=99.0)) == {"agreement:toy": False}
    (gate,) = EvalGates(min_agreement=91.0).check(result, "onnxruntime int8")
    assert "top-1 agreement with onnxruntime int8 90.00% (at least 91%)" in gate.detail
    assert "after one grey level 92.50% (worst draw 90.00%)" in gate.detail
    twenty = Dataset(np.zeros((20, 1)), "toy", "x")
    small = evaluate_outputs(candidate[:20], reference[:20], twenty, "toy").to_dict()
    small["top1_agreement"] = 95.0  # one input of 20
    (gate,) = EvalGates(min_agreement=99.0).check(small, "fp32")
    assert gate.passed and "one input of 20 allowed" in gate.detail
    cosine = result["cosine_mean"]
    assert verdict(EvalGates(min_cosine=cosine)) == {"cosine:toy": True}
    assert verdict(EvalGates(min_cosine=cosine + 1e-6)) == {"cosine:toy": False}
    overlap = result["top5_overlap"]
    assert verdict(EvalGates(min_top5_overlap=overlap)) == {"top5_overlap:toy": True}
    assert verdict(EvalGates(min_top5_overlap=overlap + 0.5)) == {"top5_overlap:toy": False}
    assert verdict(EvalGates(max_accuracy_drop=10.0)) == {"accuracy:toy": True}
    assert verdict(EvalGates(max_accuracy_drop=9.0)) == {"accuracy:toy": False}
    all_four = EvalGates(
        min_agreement=80, min_top5_overlap=50, min_cosine=0.5, max_accuracy_drop=20
    )
    assert list(verdict(all_four)) == [
        "agreement:toy",
        "top5_overlap:toy",
        "cosine:toy",
        "accuracy:toy",
    ]
    for bad, flag in (
        (EvalGates(min_agreement=0), "--min-agreement"),
        (EvalGates(min_top5_overlap=101), "--min-top5-overlap"),
        (EvalGates(min_cosine=1.5), "--min-cosine"),
        (EvalGates(max_accuracy_drop=-1), "--max-accuracy-drop"),
    ):
        with pytest.raises(UserError, match=flag):
            bad.validate()


def test_decisive_agreement_tells_near_tie_flips_from_real_errors() -> None:
    # Five inputs: 0-2 decisive (lead 0.9 or more), 3-4 near ties (lead 0.02).
    probs = np.array(
        [
            [0.95, 0.03, 0.02],
            [0.02, 0.96, 0.02],
            [0.01, 0.04, 0.95],
            [0.49, 0.47, 0.04],
            [0.30, 0.34, 0.36],
        ]
    )
    logits = np.log(probs).astype(np.float32)
    candidate = logits.copy()
    candidate[3, [0, 1]] = candidate[3, [1, 0]]  # a near tie flips
    count, agreement = decisive_agreement(logits, candidate)
    assert (count, agreement) == (3, 100.0)
    candidate[0, [0, 1]] = candidate[0, [1, 0]]  # a decisive input flips: a real error
    count, agreement = decisive_agreement(logits, candidate)
    assert count == 3 and agreement == pytest.approx(200.0 / 3)
    # Probabilities are used as they are (a softmax would shrink every lead).
    assert decisive_agreement(probs, probs)[0] == 3
    assert decisive_agreement(probs, probs, margin=0.95)[0] == 0
    assert decisive_agreement(probs[:, :1], probs[:, :1]) == (None, None)
    data = Dataset(inputs=np.zeros((5, 1)), source="toy", sha256="x")
    result = evaluate_outputs(candidate, logits, data, "toy fp32")
    assert result.top1_agreement == 60.0
    assert (result.decisive_samples, result.decisive_agreement) == (3, pytest.approx(200.0 / 3))
    line = accuracy_line(result.to_dict())
    assert "top-1 60.0% (66.7% on the 3 where fp32 leads by ≥ 0.05)" in line, line


@pytest.mark.onnxruntime
@pytest.mark.openvino
@pytest.mark.parametrize("recalibrated", [False, True], ids=["as-built", "bn-recalibrated"])
def test_eval_command_on_a_run_folder(
    tmp_path: Path, cli_env: dict[str, str], recalibrated: bool
) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    run = CliRunner().invoke(
        main,
        ["export", "tinynets:tiny_net", "-t", "onnxruntime", "-o", str(tmp_path), "--runs", "5"]
        + ["--warmup", "1", "--min-seconds", "0", "--fidelity-samples", "4", "--json"]
        + ["--input-size", "64"]
        + (["--bn-recalibrate"] if recalibrated else []),
        catch_exceptions=False,
    )
    assert run.exit_code == 0, run.output
    report = json.loads(run.stdout)
    # The reference `eval` rebuilds must be the model that was exported.
    assert report["weights"] == ("random, bn-recalibrated" if recalibrated else "random")
    assert report["accuracy"] is None  # random weights: no real-data evaluation by default
    run_dir = tmp_path / "tiny_net" / "onnxruntime-fp32"
    result = CliRunner().invoke(
        main,
        ["eval", str(run_dir), "--data", "imagenet-photos20", "--samples", "6", "--json"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    evaluation = json.loads(result.stdout)["evaluation"]
    assert evaluation["samples"] == 6 and evaluation["labelled"]
    assert evaluation["top1_agreement"] == 100.0 and evaluation["cosine_min"] > 0.9999
    assert evaluation["drop"] == 0.0
    saved = json.loads((run_dir / "report.json").read_text())
    assert saved["accuracy"]["imagenet-photos20"]["samples"] == 6
    if not recalibrated:
        steady = CliRunner().invoke(
            main,
            ["eval", str(run_dir), "--data", "imagenet-photos20", "--samples", "6"]
            + ["--stability", "2", "--no-save", "--json"],
            catch_exceptions=False,
        )
        assert steady.exit_code == 0, steady.output
        stability = json.loads(steady.stdout)["evaluation"]["stability"]
        assert stability["draws"] == 2 and stability["samples"] == 6
        # FP32 does not notice one grey level.
        assert stability["top1_agreement"] == 100.0 and stability["cosine_min"] > 0.9999
        negative = CliRunner().invoke(
            main, ["eval", str(run_dir), "--data", "imagenet-photos20"] + ["--stability", "-1"]
        )
        assert negative.exit_code == 2 and "--stability" in negative.output
        assert len(negative.output.strip().splitlines()) == 1
    other = tmp_path / "other"
    CliRunner().invoke(
        main,
        ["export", "tinynets:tiny_net", "-t", "openvino", "-o", str(other), "--runs", "5"]
        + ["--warmup", "1", "--min-seconds", "0", "--fidelity-samples", "4", "--json"]
        + ["--input-size", "64"]
        + (["--bn-recalibrate"] if recalibrated else []),
        catch_exceptions=False,
    )
    cross = CliRunner().invoke(
        main,
        ["eval", str(run_dir), "--data", "imagenet-photos20", "--samples", "6", "--json"]
        + ["--against", str(other / "tiny_net" / "openvino-fp32")],
        catch_exceptions=False,
    )
    assert cross.exit_code == 0, cross.output
    versus = json.loads(cross.stdout)["evaluation"]
    assert versus["reference"].startswith("openvino fp32") and versus["cosine_min"] > 0.9999
    assert versus["top1_agreement"] == 100.0
    if not recalibrated:
        _eval_gates_pass_and_fail(tmp_path, run_dir, other / "tiny_net" / "openvino-fp32")
    bad = CliRunner().invoke(main, ["eval", str(run_dir), "--data", "no-such-set"])
    assert bad.exit_code == 2 and "does not exist" in bad.output


def _eval_gates_pass_and_fail(tmp_path: Path, run_dir: Path, openvino_run: Path) -> None:
    """`deploykit eval` gates: pass on two backends of one model, exit 1 on another model."""
    args = ["eval", str(run_dir), "--data", "imagenet-photos20", "--samples", "6", "--json"]
    gates = ["--min-agreement", "99", "--min-cosine", "0.9999", "--min-top5-overlap", "99"]
    passed = CliRunner().invoke(
        main,
        args + ["--against", str(openvino_run), *gates, "--max-accuracy-drop", "0"],
        catch_exceptions=False,
    )
    assert passed.exit_code == 0, passed.output
    result = json.loads(passed.stdout)
    assert result["status"] == "ok"
    assert [g["name"] for g in result["gates"]] == [
        "agreement:imagenet-photos20",
        "top5_overlap:imagenet-photos20",
        "cosine:imagenet-photos20",
        "accuracy:imagenet-photos20",
    ]
    assert all(g["passed"] for g in result["gates"])
    assert "with openvino fp32" in result["gates"][0]["detail"]
    # The same net with other random weights answers differently: the gates fail.
    stranger = CliRunner().invoke(
        main,
        ["export", "tinynets:tiny_net_reseeded", "-t", "onnxruntime", "-o", str(tmp_path / "seed1")]
        + ["--input-size", "64", "--runs", "5", "--warmup", "1"]
        + ["--min-seconds", "0", "--fidelity-samples", "4", "--json"],
        catch_exceptions=False,
    )
    assert stranger.exit_code == 0, stranger.output
    failed = CliRunner().invoke(
        main,
        args
        + ["--against", str(tmp_path / "seed1" / "tiny_net_reseeded" / "onnxruntime-fp32"), *gates],
    )
    assert failed.exit_code == 1, failed.output
    verdict = json.loads(failed.stdout)
    assert verdict["status"].startswith("failed: agreement:imagenet-photos20")
    assert not verdict["gates"][0]["passed"] and not verdict["gates"][2]["passed"]
    error = failed.stderr.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: tiny_net onnxruntime fp32: ")
    assert (
        "agreement:imagenet-photos20 gate failed (top-1 agreement with onnxruntime fp32" in error[0]
    )
    unlabelled = CliRunner().invoke(
        main, ["eval", str(run_dir), "--data", "natural-images", "--max-accuracy-drop", "1"]
    )
    assert unlabelled.exit_code == 2
    assert "--max-accuracy-drop needs a labelled set" in unlabelled.output
    assert len(unlabelled.output.strip().splitlines()) == 1
    out_of_range = CliRunner().invoke(
        main, ["eval", str(run_dir), "--data", "imagenet-photos20", "--min-cosine", "2"]
    )
    assert out_of_range.exit_code == 2 and "--min-cosine" in out_of_range.output

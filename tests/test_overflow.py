"""INT8 weights bounded so that 16-bit INT8 sums (CPUs without VNNI) cannot saturate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from runners import openvino_each, run_each

from deploykit import api
from deploykit.cli import main
from deploykit.errors import GateError, UserError
from deploykit.harness.fidelity import compare_outputs
from deploykit.harness.inputs import synthetic_images
from deploykit.models.contract import InputContract
from deploykit.stages import overflow
from deploykit.stages.calibrate import CalibrationOptions

XEON = {"arch": "x86_64", "name": "Xeon", "features": ["avx2", "avx512f", "avx512_vnni"]}
EPYC = {"arch": "x86_64", "name": "EPYC", "features": ["avx2", "fma"]}
ARM = {"arch": "aarch64", "name": "Neoverse", "features": ["neon", "asimddp"]}


def _pair_sums(q: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Largest |q_a| x_a + |q_b| x_b over neighbours, both reduction orders, per channel."""
    out, cin = q.shape[:2]
    mag = np.abs(q).reshape(out, cin, -1)
    x = np.broadcast_to(codes[:, None], mag.shape[1:])
    worst = np.zeros(out)
    for flat, xs in (
        (mag.reshape(out, -1), x.reshape(-1)),
        (mag.transpose(0, 2, 1).reshape(out, -1), x.T.reshape(-1)),
    ):
        worst = np.maximum(worst, (flat[:, :-1] * xs[:-1] + flat[:, 1:] * xs[1:]).max(axis=1))
    return worst


@pytest.mark.parametrize("shape", [(8, 16, 3, 3), (8, 32, 1, 1), (10, 64)])
def test_bounded_scales_keep_every_neighbour_pair_within_16_bits(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    weights = rng.normal(size=shape)
    weights[:, :2] *= 6.0  # a large neighbouring pair in each channel
    codes = np.full(shape[1], 255.0)
    codes[::3] = 40.0  # channels that never fire high
    bound = overflow.bounded_amax(weights, codes)
    scale = (bound / 127.0).reshape(-1, *[1] * (len(shape) - 1))
    q = np.round(weights / scale)
    assert np.abs(q).max() <= 127
    assert _pair_sums(q, codes).max() <= overflow.INT16_MAX
    # Full-range scales would overflow these same weights.
    full = np.abs(weights).reshape(shape[0], -1).max(axis=1) / 127.0
    q_full = np.round(weights / full.reshape(scale.shape))
    assert _pair_sums(q_full, codes).max() > overflow.INT16_MAX


def test_channels_that_stay_low_cost_no_resolution() -> None:
    rng = np.random.default_rng(1)
    weights = rng.normal(size=(4, 8, 1, 1))
    codes = np.full(8, 100.0)  # 2 x 127 x 100 < 32767
    amax = np.abs(weights).reshape(4, -1).max(axis=1)
    np.testing.assert_allclose(overflow.bounded_amax(weights, codes), amax)


def test_input_codes_follow_the_grid_of_the_tensor() -> None:
    peaks = np.array([6.0, 3.0, 0.0, -1.0])
    np.testing.assert_array_equal(
        overflow.input_codes(0.0, 6.0, peaks, 4, margin=1.0), [255, 128, 0, 0]
    )
    # Signed tensors sit around code 128 (u8s8's zero point, oneDNN's +128 shift).
    np.testing.assert_array_equal(
        overflow.input_codes(-2.0, 2.0, np.array([2.0, 1.0, -1.0]), 3, margin=1.0),
        [255, 192, 128],
    )
    np.testing.assert_array_equal(overflow.input_codes(0.0, 6.0, None, 3), [255, 255, 255])
    assert overflow.input_codes(0.0, 6.0, np.array([1.0, 1.0]), 2, margin=1.5).tolist() == [64, 64]


def test_auto_bounds_the_cpu_encodings_only_where_the_cpu_lacks_vnni() -> None:
    assert overflow.cpu_saturates(EPYC)
    assert not overflow.cpu_saturates(XEON)
    assert not overflow.cpu_saturates(ARM)
    assert overflow.decide("auto", "u8s8", EPYC)[0]
    assert overflow.decide("auto", "mixed", EPYC)[0]
    assert not overflow.decide("auto", "s8s8", EPYC)[0]
    assert not overflow.decide("auto", "u8s8", XEON)[0]
    assert overflow.decide("on", "s8s8", XEON)[0]
    assert not overflow.decide("off", "u8s8", EPYC)[0]


@pytest.fixture(scope="module")
def saturating(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("overflow")
    files = {}
    for encoding in ("u8s8", "mixed"):
        for mode in ("on", "off"):
            result = api.calibrate(
                "tinynets:saturating_net",
                "synthetic",
                root / f"{encoding}-{mode}",
                samples=16,
                encoding=encoding,
                input_size=(16, 16),
                calib_cache=False,
                overflow_fix=mode,
            )
            files[f"{encoding}-{mode}"] = Path(result["out"])
    return files


def _inputs() -> np.ndarray:
    contract = InputContract(channels=3, height=16, width=16)
    return synthetic_images(contract, 16, seed=7)


def test_the_fix_is_recorded_and_bounds_only_the_pairing_layers(
    saturating: dict[str, Path],
) -> None:
    on = json.loads((saturating["u8s8-on"] / "calibration.json").read_text())
    off = json.loads((saturating["u8s8-off"] / "calibration.json").read_text())
    fix = on["calibration"]["overflow_fix"]
    assert fix["applied"] and fix["bound"] == "calibration" and fix["layers"] == 3
    assert fix["resolution"] < 0.9  # the 1x1 convolution's weights had to give way
    assert off["calibration"]["overflow_fix"] == {
        "applied": False,
        "reason": "off",
        "layers": 0,
        "resolution": 1.0,
        "bound": "",
    }


@pytest.mark.parametrize(
    "encoding",
    ["u8s8", pytest.param("mixed", marks=pytest.mark.openvino)],
)
def test_int8_kernels_compute_the_bounded_file_exactly(
    saturating: dict[str, Path], encoding: str
) -> None:
    # u8s8 is ONNX Runtime's file, mixed OpenVINO's; the float reference is ONNX Runtime
    # with its graph optimisations off (no INT8 kernels).
    kernels = run_each if encoding == "u8s8" else openvino_each
    x = _inputs()
    path = saturating[f"{encoding}-on"] / "model.int8.qdq.onnx"
    assert compare_outputs(run_each(path, x, optimise=False), kernels(path, x)).cosine > 0.9999
    if overflow.cpu_saturates():
        # Full-range weights on this CPU: the INT8 kernels clamp and leave the file.
        path = saturating[f"{encoding}-off"] / "model.int8.qdq.onnx"
        clamped = compare_outputs(run_each(path, x, optimise=False), kernels(path, x))
        assert clamped.cosine < 0.999, clamped


@pytest.mark.parametrize("mode", ["auto", "off"])
def test_an_export_records_the_fix_and_warns_when_it_is_off_where_needed(
    tmp_path: Path, mode: str
) -> None:
    request = api.ExportRequest(
        model="tinynets:tiny_net",
        target="onnxruntime",
        precision="int8",
        input_size=(32, 32),
        calib="synthetic",
        calib_samples=8,
        overflow_fix=mode,
        runs=2,
        warmup=1,
        min_seconds=0.0,
        fidelity_samples=4,
        fallback=False,
        out=str(tmp_path),
    )
    try:
        api.export(request)
    except GateError:  # full-range weights on a CPU without VNNI may miss the gate
        assert mode == "off" and overflow.cpu_saturates()
    report = api.load_report(tmp_path / "tiny_net" / "onnxruntime-int8")
    fix = next(s for s in report.stages if s.name == "calibrate").details["overflow_fix"]
    assert fix["applied"] == (mode == "auto" and overflow.cpu_saturates())
    warned = any("without VNNI" in note for note in report.notes)
    assert warned == (mode == "off" and overflow.cpu_saturates())


def test_an_unknown_overflow_fix_is_bad_input() -> None:
    result = CliRunner().invoke(
        main, ["export", "tinynets:tiny_net", "-t", "onnxruntime", "--overflow-fix", "always"]
    )
    assert result.exit_code == 2 and "always" in result.output
    with pytest.raises(UserError, match="overflow fix"):
        CalibrationOptions(overflow_fix="always").validate()

"""Shared fixtures; skips marked tests with the backend's own reason when it cannot run here."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

_BACKEND_MARKERS = ("onnxruntime", "openvino", "tensorrt")


def _backend_skip_reason(name: str) -> str | None:
    from deploykit.backends.registry import get_backend

    availability = get_backend(name).is_available()
    return None if availability.ok else f"{name}: {availability.message()}"


def _gpu_skip_reason() -> str | None:
    import torch

    return None if torch.cuda.is_available() else "no CUDA GPU on this machine"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    run_slow = os.environ.get("DEPLOYKIT_SLOW") == "1" or "slow" in (config.option.markexpr or "")
    reasons: dict[str, str | None] = {}
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: run with -m slow or DEPLOYKIT_SLOW=1"))
            continue
        for marker in (*_BACKEND_MARKERS, "gpu"):
            if marker not in item.keywords:
                continue
            if marker not in reasons:
                reasons[marker] = (
                    _gpu_skip_reason() if marker == "gpu" else _backend_skip_reason(marker)
                )
            if reasons[marker]:
                item.add_marker(pytest.mark.skip(reason=reasons[marker]))


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """Environment for `deploykit` subprocesses: tests/ importable, no colour, wide output."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), env.get("PYTHONPATH")]))
    env["COLUMNS"] = "200"
    env["NO_COLOR"] = "1"
    yield env


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Calibration statistics are cached in a per-session folder, never in ~/.cache."""
    old = os.environ.get("DEPLOYKIT_CACHE_DIR")
    os.environ["DEPLOYKIT_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("DEPLOYKIT_CACHE_DIR", None)
    else:
        os.environ["DEPLOYKIT_CACHE_DIR"] = old

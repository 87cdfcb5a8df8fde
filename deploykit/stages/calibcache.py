"""On-disk cache of calibration statistics and GPTQ weight codes: one collection, and one
rounding, reused by every encoding and run.

An entry holds the per-tensor activation ranges that one calibration pass
produced, keyed by everything that determines them: the fused model's bytes,
the calibration data (its source digest, count, input shape and the digest of
the preprocessed array), the method (and the percentile where the method uses
it), the onnxruntime version (its calibrators, pre-processing and bin counts)
and this module's schema version. Entries are JSON files named by the key:

    {"schema": 1, "key": "<sha256>", "key_fields": {...},
     "ranges": {"tensor": [lo, hi], ...}, "checksum": "<sha256 of key_fields + ranges>"}

They are written atomically. A read checks everything it can (valid JSON, the
checksum, the key fields, finite ranges, tensor names that exist in the model)
and reports why an entry was rejected; a rejected entry is recomputed and
rewritten, never used.

The GPTQ codes of `deploykit.stages.rounding` are cached beside them, in ``.gptq.npz``
entries checked the same way (see `load_codes`).

Location: ``$DEPLOYKIT_CACHE_DIR/calibration/`` when that variable is set, else
``${XDG_CACHE_HOME:-~/.cache}/deploykit/calibration/``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deploykit.fsutil import sha256_file, write_bytes_atomic, write_text_atomic
from deploykit.harness.datasets import Dataset

SCHEMA_VERSION = 4  # 2: entropy on 2048 bins; 3: KL search over |x|; 4: point masses kept
ENV_VAR = "DEPLOYKIT_CACHE_DIR"

Ranges = dict[str, tuple[float, float]]


def cache_dir() -> Path:
    """The folder that holds calibration entries (see the module docstring)."""
    root = os.environ.get(ENV_VAR)
    if root:
        return Path(root).expanduser() / "calibration"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "deploykit" / "calibration"


@dataclass(frozen=True)
class CacheKey:
    """Everything that determines a set of calibration statistics.

    Attributes:
        model_sha256: Digest of the fused ONNX file's bytes.
        data_sha256: Digest of the raw calibration data (as the dataset reports it).
        data_count: Number of calibration inputs.
        input_shape: Shape of the preprocessed input array (N, C, H, W).
        inputs_sha256: Digest of the preprocessed float32 array, so that a change of
            preprocessing (mean, std, resize) over the same files is a different key.
        method: minmax, entropy, percentile or mse.
        percentile: The percentile for ``method="percentile"``; None for the other
            methods, which do not use it (changing it must not discard their entries).
        onnxruntime: The onnxruntime version that computes the statistics.
        schema: This cache's schema version.
    """

    model_sha256: str
    data_sha256: str
    data_count: int
    input_shape: tuple[int, ...]
    inputs_sha256: str
    method: str
    percentile: float | None
    onnxruntime: str
    schema: int = SCHEMA_VERSION

    @classmethod
    def build(cls, fused: Path, data: Dataset, method: str, percentile: float) -> CacheKey:
        """The key for calibrating `fused` on `data` with `method`."""
        import onnxruntime

        inputs = np.ascontiguousarray(data.inputs, dtype=np.float32)
        return cls(
            model_sha256=sha256_file(fused),
            data_sha256=data.sha256,
            data_count=int(inputs.shape[0]),
            input_shape=tuple(int(d) for d in inputs.shape),
            inputs_sha256=hashlib.sha256(inputs.tobytes()).hexdigest(),
            method=method,
            percentile=float(percentile) if method == "percentile" else None,
            onnxruntime=str(onnxruntime.__version__),
        )

    def fields(self) -> dict[str, Any]:
        """Plain-JSON form of the key fields."""
        out = asdict(self)
        out["input_shape"] = list(self.input_shape)
        return out

    def digest(self) -> str:
        """The hex sha256 that names the entry."""
        return hashlib.sha256(_canonical(self.fields()).encode()).hexdigest()


@dataclass(frozen=True)
class CacheLookup:
    """The outcome of reading an entry.

    Attributes:
        ranges: The cached ranges, or None when there is nothing usable.
        status: ``hit``, ``miss`` or ``rebuilt: <why the entry was rejected>``.
        path: The entry's file.
    """

    ranges: Ranges | None
    status: str
    path: Path


def entry_path(key: CacheKey, root: Path | None = None) -> Path:
    """Where the entry for `key` lives."""
    return (root or cache_dir()) / f"{key.digest()}.json"


def load(key: CacheKey, known_tensors: Collection[str], root: Path | None = None) -> CacheLookup:
    """Read and verify the entry for `key`.

    Args:
        key: The key of the statistics wanted.
        known_tensors: Tensor names of the model being quantized; an entry that names
            any other tensor is rejected.
        root: Cache folder (default: `cache_dir()`).

    Returns:
        The ranges on a hit; otherwise no ranges and ``miss`` or ``rebuilt: <reason>``.
    """
    path = entry_path(key, root)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return CacheLookup(None, "miss", path)
    except (OSError, UnicodeDecodeError) as exc:
        return CacheLookup(None, f"rebuilt: unreadable entry ({type(exc).__name__}: {exc})", path)
    ranges, problem = _verify(text, key, known_tensors)
    if problem is not None:
        return CacheLookup(None, f"rebuilt: {problem}", path)
    return CacheLookup(ranges, "hit", path)


def store(
    key: CacheKey, ranges: Mapping[str, tuple[float, float]], root: Path | None = None
) -> Path:
    """Write the entry for `key` atomically and return its path.

    Raises:
        OSError: The cache folder cannot be written.
    """
    path = entry_path(key, root)
    body = {
        "key_fields": key.fields(),
        "ranges": {name: [float(lo), float(hi)] for name, (lo, hi) in sorted(ranges.items())},
    }
    entry = {
        "schema": SCHEMA_VERSION,
        "key": key.digest(),
        **body,
        "checksum": hashlib.sha256(_canonical(body).encode()).hexdigest(),
    }
    write_text_atomic(path, json.dumps(entry, indent=1) + "\n")
    return path


def _verify(
    text: str, key: CacheKey, known_tensors: Collection[str]
) -> tuple[Ranges | None, str | None]:
    """Parse and check an entry; return (ranges, None) or (None, reason)."""
    try:
        entry = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"invalid JSON ({exc.msg} at line {exc.lineno})"
    if not isinstance(entry, dict):
        return None, "malformed entry (not a JSON object)"
    missing = [f for f in ("schema", "key_fields", "ranges", "checksum") if f not in entry]
    if missing:
        return None, f"malformed entry (missing {', '.join(missing)})"
    if entry["schema"] != SCHEMA_VERSION:
        return None, f"schema {entry['schema']!r}, expected {SCHEMA_VERSION}"
    body = {"key_fields": entry["key_fields"], "ranges": entry["ranges"]}
    try:
        checksum = hashlib.sha256(_canonical(body).encode()).hexdigest()
    except ValueError as exc:  # NaN/inf are not canonical JSON
        return None, f"malformed entry ({exc})"
    if checksum != entry["checksum"]:
        return None, "checksum mismatch (the entry was modified or damaged)"
    if entry["key_fields"] != key.fields():
        fields = entry["key_fields"] if isinstance(entry["key_fields"], dict) else {}
        differ = sorted(k for k, v in key.fields().items() if fields.get(k) != v)
        return None, f"key fields differ ({', '.join(differ) or 'extra fields'})"
    return _parse_ranges(entry["ranges"], known_tensors)


def _parse_ranges(raw: Any, known_tensors: Collection[str]) -> tuple[Ranges | None, str | None]:
    """Ranges from an entry's JSON, or the reason they cannot be used."""
    if not isinstance(raw, dict) or not raw:
        return None, "malformed entry (no ranges)"
    ranges: Ranges = {}
    for name, pair in raw.items():
        ok = (
            isinstance(pair, list)
            and len(pair) == 2
            and all(isinstance(v, int | float) and math.isfinite(v) for v in pair)
        )
        if not ok or pair[0] > pair[1]:
            return None, f"bad range for tensor {name!r}: {pair!r}"
        if name not in known_tensors:
            return None, f"tensor {name!r} does not exist in the model"
        ranges[name] = (float(pair[0]), float(pair[1]))
    return ranges, None


def _canonical(data: Any) -> str:
    """Deterministic JSON text used for digests (sorted keys, no spaces, no NaN)."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)


# GPTQ weight codes (`deploykit.stages.rounding`). They depend on the FP32 model, the
# calibration inputs and each layer's grid, not on the activation encoding, so one entry
# serves every backend's file of one calibration: the second backend's export skips the
# input second moments (EfficientNet-Lite0: 18 of its 20 s of rounding on 2 cores).
# Entries are .npz files (no pickles) named by the key, with a checksum over the codes.
CODES_SCHEMA = 1


@dataclass(frozen=True)
class CodesLookup:
    """The outcome of reading a GPTQ codes entry.

    Attributes:
        vectors: Input vectors per layer, by node name (None unless a hit).
        codes: The rounded codes of each rounded layer, by node name (None unless a hit).
        status: ``hit``, ``miss`` or ``rebuilt: <why the entry was rejected>``.
        path: The entry's file.
    """

    vectors: dict[str, int] | None
    codes: dict[str, np.ndarray] | None
    status: str
    path: Path


def codes_path(digest: str, root: Path | None = None) -> Path:
    """Where the GPTQ codes entry named `digest` lives."""
    return (root or cache_dir()) / f"{digest}.gptq.npz"


def load_codes(
    digest: str, shapes: Mapping[str, tuple[int, ...]], root: Path | None = None
) -> CodesLookup:
    """Read and verify the codes entry `digest` for layers of the given weight shapes."""
    path = codes_path(digest, root)
    if not path.is_file():
        return CodesLookup(None, None, "miss", path)
    try:
        with np.load(path, allow_pickle=False) as entry:
            meta = json.loads(str(entry["meta"]))
            arrays = {name: entry[f"codes{i}"] for i, name in enumerate(meta["rounded"])}
    except Exception as exc:  # a damaged zip, a missing array, bad JSON: rebuild
        return CodesLookup(None, None, f"rebuilt: unreadable entry ({type(exc).__name__})", path)
    if meta.get("key") != digest or meta.get("schema") != CODES_SCHEMA:
        return CodesLookup(None, None, "rebuilt: key or schema differs", path)
    if meta.get("checksum") != _codes_checksum(meta["vectors"], arrays):
        return CodesLookup(None, None, "rebuilt: checksum mismatch (damaged entry)", path)
    if set(meta["vectors"]) != set(shapes) or any(
        arrays[name].shape != tuple(shapes[name]) or arrays[name].dtype != np.int8
        for name in arrays
    ):
        return CodesLookup(None, None, "rebuilt: layers differ from the model's", path)
    return CodesLookup({k: int(v) for k, v in meta["vectors"].items()}, arrays, "hit", path)


def store_codes(
    digest: str,
    vectors: Mapping[str, int],
    codes: Mapping[str, np.ndarray],
    root: Path | None = None,
) -> Path:
    """Write the codes entry `digest` atomically and return its path."""
    import io

    path = codes_path(digest, root)
    rounded = list(codes)
    arrays = {name: np.ascontiguousarray(codes[name], dtype=np.int8) for name in rounded}
    meta = {
        "schema": CODES_SCHEMA,
        "key": digest,
        "rounded": rounded,
        "vectors": {k: int(v) for k, v in vectors.items()},
        "checksum": _codes_checksum(vectors, arrays),
    }
    payload = {"meta": np.array(json.dumps(meta))}
    payload.update({f"codes{i}": arrays[name] for i, name in enumerate(rounded)})
    buffer = io.BytesIO()
    np.savez(buffer, **payload)  # type: ignore[arg-type]  # numpy's stub types **kwds as bool
    write_bytes_atomic(path, buffer.getvalue())
    return path


def _codes_checksum(vectors: Mapping[str, int], codes: Mapping[str, np.ndarray]) -> str:
    digest = hashlib.sha256(_canonical({k: int(v) for k, v in vectors.items()}).encode())
    for name in sorted(codes):
        digest.update(name.encode() + b"\0")
        digest.update(np.ascontiguousarray(codes[name], dtype=np.int8).tobytes())
    return digest.hexdigest()

"""Reading, extracting and writing ``.dkb`` bundles safely (standard library only).

A bundle is a gzip-compressed tar archive. Its first member is ``manifest.json``;
every other member is a regular file listed in the manifest's ``files`` table with
its size and sha256. Reading is strict, so a bundle from an untrusted source can
do no harm:

- only regular files: symbolic links, hard links, device files, FIFOs and folders
  are refused;
- member names are relative, ``/``-separated, with no ``..``, no absolute path and
  no hidden or empty parts;
- every member's size must equal the size the manifest declares (so an oversized
  member is refused before it is read) and stay under a hard limit;
- every member's sha256 must match; a member the manifest does not list, a
  duplicate, a missing one, or a truncated or corrupt archive is refused;
- an unknown schema version is refused with the fix (upgrade deploykit).

Nothing is written while reading. :func:`extract_bundle` writes only after the
whole bundle has been checked, into a staging folder that is renamed into place.
This module is used on the device by :mod:`deploykit.runtime`, so it imports
neither pydantic nor any runtime.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploykit.errors import UserError

BUNDLE_KIND = "deploykit-bundle"
SCHEMA_VERSION = 1
SUPPORTED_SCHEMA_VERSIONS = (1,)
MANIFEST_NAME = "manifest.json"
BUNDLE_SUFFIX = ".dkb"
MAX_MANIFEST_BYTES = 4 << 20
# Largest member accepted by default (a model file); `max_member_bytes` overrides it.
MAX_MEMBER_BYTES = 4 << 30
MAX_MEMBERS = 64
_PART_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+-]*$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_FIX = "the bundle is corrupt or unsafe; package it again or fetch an intact copy"


class BundleError(UserError):
    """A bundle that is unsafe, corrupt, tampered with, or not for this machine."""


@dataclass
class Bundle:
    """A bundle read into memory and checked.

    Attributes:
        path: The archive.
        manifest: The manifest as parsed JSON (checked structurally, see :func:`check_header`).
        manifest_sha256: sha256 of the manifest's bytes: the bundle's identity.
        files: Member name -> content, every one matching its sha256.
        archive_bytes: Size of the archive file.
    """

    path: Path
    manifest: dict[str, Any]
    manifest_sha256: str
    files: dict[str, bytes]
    archive_bytes: int


def check_member_name(name: str) -> str:
    """Return `name` if it is a safe relative member name, else raise BundleError."""
    if not isinstance(name, str) or not name:
        raise BundleError(f"bundle member with an empty name; {_FIX}")
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise BundleError(f"bundle member {name!r} has an absolute path; {_FIX}")
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        raise BundleError(f"bundle member {name!r} points outside the bundle ('..'); {_FIX}")
    if "\\" in name or len(name) > 200 or not all(_PART_RE.match(p) for p in parts):
        raise BundleError(f"bundle member name {name!r} is not allowed; {_FIX}")
    return name


def _check_member_type(info: tarfile.TarInfo) -> None:
    if info.isreg():
        return
    kind = (
        "a symbolic link"
        if info.issym()
        else "a hard link"
        if info.islnk()
        else "a device file"
        if info.isdev()
        else "a folder"
        if info.isdir()
        else "not a regular file"
    )
    raise BundleError(f"bundle member {info.name!r} is {kind}; {_FIX}")


def check_header(manifest: Any) -> dict[str, dict[str, Any]]:
    """Check the parts of a manifest the reader relies on; return its ``files`` table.

    Raises:
        BundleError: Not a deploykit manifest, an unknown schema version, or a bad files table.
    """
    if not isinstance(manifest, dict) or manifest.get("kind") != BUNDLE_KIND:
        raise BundleError(f"{MANIFEST_NAME} is not a deploykit bundle manifest; {_FIX}")
    version = manifest.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise BundleError(f"bundle manifest has no valid schema_version; {_FIX}")
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        newest = max(SUPPORTED_SCHEMA_VERSIONS)
        fix = (
            "upgrade deploykit on this machine"
            if version > newest
            else "package the run again with this deploykit"
        )
        raise BundleError(
            f"bundle schema version {version} is not one this deploykit reads "
            f"({', '.join(map(str, SUPPORTED_SCHEMA_VERSIONS))}); {fix}"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not files or len(files) > MAX_MEMBERS:
        raise BundleError(f"bundle manifest has no valid files table; {_FIX}")
    for name, entry in files.items():
        check_member_name(name)
        if name == MANIFEST_NAME:
            raise BundleError(f"bundle manifest lists itself; {_FIX}")
        size = entry.get("size") if isinstance(entry, dict) else None
        digest = entry.get("sha256") if isinstance(entry, dict) else None
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise BundleError(f"bundle manifest has no valid size for {name!r}; {_FIX}")
        if not isinstance(digest, str) or not _SHA256_RE.match(digest):
            raise BundleError(f"bundle manifest has no valid sha256 for {name!r}; {_FIX}")
    return files


def read_bundle(path: str | Path, max_member_bytes: int = MAX_MEMBER_BYTES) -> Bundle:
    """Read and check a bundle entirely in memory (nothing is written).

    Args:
        path: The ``.dkb`` archive.
        max_member_bytes: Largest member accepted.

    Returns:
        The bundle, every file matching the size and sha256 its manifest declares.

    Raises:
        BundleError: Missing, truncated, corrupt, unsafe or tampered bundle (exit 2).
    """
    path = Path(path)
    if not path.is_file():
        raise BundleError(
            f"bundle {path} does not exist; pass a .dkb file made by deploykit package"
        )
    try:
        with open(path, "rb") as raw:
            if raw.read(2) != b"\x1f\x8b":
                raise BundleError(f"{path} is not a bundle (not gzip-compressed); {_FIX}")
            raw.seek(0)
            with gzip.GzipFile(fileobj=raw, mode="rb") as stream:
                with tarfile.open(fileobj=stream, mode="r|") as archive:
                    bundle = _read_members(path, archive, max_member_bytes)
                # Read to the end: the gzip trailer (CRC and length) proves nothing was cut off.
                while stream.read(1 << 20):
                    pass
            return bundle
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise BundleError(f"bundle {path} is truncated or not a bundle ({exc}); {_FIX}") from exc
    except OSError as exc:
        raise BundleError(f"cannot read bundle {path}: {exc}") from exc


def _read_members(path: Path, archive: tarfile.TarFile, max_member_bytes: int) -> Bundle:
    manifest: dict[str, Any] | None = None
    manifest_sha = ""
    declared: dict[str, dict[str, Any]] = {}
    files: dict[str, bytes] = {}
    for info in archive:
        check_member_name(info.name)
        _check_member_type(info)
        if manifest is None:
            if info.name != MANIFEST_NAME:
                raise BundleError(f"bundle {path} does not start with {MANIFEST_NAME}; {_FIX}")
            if info.size > MAX_MANIFEST_BYTES:
                raise BundleError(f"bundle manifest is oversized ({info.size} bytes); {_FIX}")
            raw = _read(archive, info)
            manifest_sha = hashlib.sha256(raw).hexdigest()
            try:
                manifest = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise BundleError(f"bundle manifest is not valid JSON ({exc}); {_FIX}") from exc
            declared = check_header(manifest)
            continue
        entry = declared.get(info.name)
        if entry is None:
            raise BundleError(f"bundle member {info.name!r} is not in the manifest; {_FIX}")
        if info.name in files:
            raise BundleError(f"bundle member {info.name!r} appears twice; {_FIX}")
        if entry["size"] > max_member_bytes or info.size > max_member_bytes:
            raise BundleError(
                f"bundle member {info.name!r} is oversized ({max(entry['size'], info.size)} "
                f"bytes, limit {max_member_bytes}); {_FIX}"
            )
        if info.size != entry["size"]:
            raise BundleError(
                f"bundle member {info.name!r} is {info.size} bytes but the manifest says "
                f"{entry['size']}; {_FIX}"
            )
        data = _read(archive, info)
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise BundleError(
                f"bundle file {info.name!r} does not match its sha256 in the manifest "
                f"(tampered or corrupt); {_FIX}"
            )
        files[info.name] = data
    if manifest is None:
        raise BundleError(f"bundle {path} is empty; {_FIX}")
    missing = sorted(set(declared) - set(files))
    if missing:
        raise BundleError(
            f"bundle lacks {missing[0]!r}, listed in its manifest (truncated?); {_FIX}"
        )
    return Bundle(path, manifest, manifest_sha, files, path.stat().st_size)


def _read(archive: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    handle = archive.extractfile(info)
    if handle is None:  # pragma: no cover - regular files always have a handle
        raise BundleError(f"bundle member {info.name!r} cannot be read; {_FIX}")
    data = handle.read()
    if len(data) != info.size:
        raise BundleError(f"bundle member {info.name!r} is truncated; {_FIX}")
    return data


def extract_bundle(
    path: str | Path, dest: str | Path, max_member_bytes: int = MAX_MEMBER_BYTES
) -> Bundle:
    """Check a bundle completely, then write its files into `dest` atomically.

    Nothing is written unless every check passes; the files go into a staging folder
    beside `dest` that is renamed to `dest` at the end (replacing an older `dest`).

    Raises:
        BundleError: As :func:`read_bundle`.
    """
    from deploykit.fsutil import staged_dir

    bundle = read_bundle(path, max_member_bytes)
    final = Path(dest)
    with staged_dir(final) as work:
        root = work.resolve()
        (work / MANIFEST_NAME).write_bytes(
            json.dumps(bundle.manifest, indent=2).encode("utf-8") + b"\n"
        )
        for name, data in bundle.files.items():
            target = (work / name).resolve()
            if root not in target.parents:  # names are checked already; never trust one path
                raise BundleError(f"bundle member {name!r} points outside the bundle; {_FIX}")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
    return bundle


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """The canonical bytes of a manifest as stored in a bundle."""
    return json.dumps(manifest, indent=2, sort_keys=False).encode("utf-8") + b"\n"


def write_bundle(
    path: str | Path, manifest: dict[str, Any], files: dict[str, bytes], mtime: int = 0
) -> int:
    """Write a bundle atomically (temporary file in the same folder, then a rename).

    Members are stored with fixed owner, mode and `mtime`, so the same inputs give
    the same bytes.

    Returns:
        The archive size in bytes.
    """
    path = Path(path)
    check_header(manifest)
    for name in files:
        check_member_name(name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror}; pass a writable -o") from exc
    try:
        with (
            os.fdopen(fd, "wb") as raw,
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=mtime) as gz,
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as archive,
        ):
            members = [(MANIFEST_NAME, manifest_bytes(manifest))]
            members += sorted(files.items())
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mode = 0o644
                info.mtime = mtime
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                archive.addfile(info, io.BytesIO(data))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path.stat().st_size

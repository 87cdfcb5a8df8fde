"""Sweeps: many recipes on a bounded local process pool or as Ray tasks, one summary.

Each recipe runs in its own process and writes its own run folder (export stages it
under a temporary name and publishes it by rename), so a failing or crashing recipe
does not stop the others and an interrupted one leaves nothing that looks complete.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploykit.errors import BackendUnavailableError, DeployKitError, GateError, UserError
from deploykit.recipes.load import RecipeError, load_recipe
from deploykit.recipes.resolve import as_dict, run_dir_of
from deploykit.recipes.schema import Recipe

Progress = Callable[[dict[str, Any], int, int], None]
# Row statuses. unavailable: could not run here (backend missing, no GPU), with the reason.
OK, UNAVAILABLE, FAILED, ERROR, INTERRUPTED = "ok", "unavailable", "failed", "error", "interrupted"
GPU_BACKENDS = frozenset({"tensorrt"})
_GRACE_SECONDS = 30.0


def _no_progress(row: dict[str, Any], done: int, total: int) -> None:
    return None


@dataclass
class SweepItem:
    """One recipe of a sweep: where it came from and its resolved form (or why not)."""

    key: str
    path: str
    recipe: Recipe | None = None
    error: str = ""

    @property
    def needs_gpu(self) -> bool:
        """TensorRT and CUDA recipes need a GPU."""
        assert self.recipe is not None
        target = self.recipe.target
        return target.backend in GPU_BACKENDS or target.device == "cuda"


@dataclass
class SweepOptions:
    """How to run a sweep.

    Attributes:
        workers: Recipes run at once (local pool).
        executor: ``local`` or ``ray``.
        address: Ray cluster address (None: the running or a new local runtime).
        overrides: ``section.key=value`` applied to every recipe.
        out: Output root for every run folder (None: each recipe's own).
        threads: Runtime threads per run when a recipe sets none (None: cores / workers).
        match: Glob patterns on the recipe key (``mobilenet_v2/*int8``); none = all.
    """

    workers: int = 1
    executor: str = "local"
    address: str | None = None
    overrides: list[str] = field(default_factory=list)
    out: str | None = None
    threads: int | None = None
    match: list[str] = field(default_factory=list)


def is_base(path: Path, root: Path) -> bool:
    """Base recipes (a file or folder whose name starts with ``_``) are not runs."""
    rel = path.relative_to(root) if path.is_relative_to(root) else Path(path.name)
    return any(part.startswith("_") for part in rel.parts)


def collect(paths: list[str]) -> list[tuple[str, Path]]:
    """(key, file) of every recipe under `paths`, in a stable order.

    Raises:
        UserError: A path that does not exist or holds no recipe.
    """
    found: list[tuple[str, Path]] = []
    for spec in paths:
        path = Path(spec)
        if path.is_file():
            found.append((str(path.with_suffix("")), path))
        elif path.is_dir():
            files = sorted(p for s in ("*.yaml", "*.yml") for p in path.rglob(s))
            for file in files:
                if not is_base(file, path):
                    found.append((str(file.relative_to(path).with_suffix("")), file))
        else:
            raise UserError(f"{spec} does not exist; pass recipe files or folders")
    if not found:
        raise UserError(f"no recipes (*.yaml) in {', '.join(paths)}")
    return found


def prepare(paths: list[str], options: SweepOptions) -> list[SweepItem]:
    """Load and resolve every recipe; a broken one becomes an item with its error."""
    from deploykit.harness.environment import usable_cores

    if options.workers < 1:
        raise UserError(f"--workers must be at least 1, got {options.workers}")
    if options.threads is not None and options.threads < 1:
        raise UserError(f"--threads must be at least 1, got {options.threads}")
    threads = options.threads or max(1, usable_cores() // options.workers)
    items = []
    for key, file in collect(paths):
        if options.match and not any(fnmatch.fnmatch(key, m) for m in options.match):
            continue
        item = SweepItem(key=key, path=str(file))
        try:
            recipe = load_recipe(file, options.overrides)
            data = as_dict(recipe)
            if options.out is not None:
                data["outputs"]["out"] = options.out
            data["outputs"]["out"] = str(Path(data["outputs"]["out"]).resolve())
            if data["target"]["threads"] is None:
                data["target"]["threads"] = threads
            item.recipe = Recipe.model_validate(data)
        except RecipeError as exc:
            item.error = str(exc)
        items.append(item)
    if not items:
        raise UserError(f"no recipe matches {', '.join(options.match)}")
    return items


def run_one(data: dict[str, Any], key: str) -> dict[str, Any]:
    """Run one resolved recipe (in a worker process) and return its summary row."""
    from deploykit.harness.report import load_report
    from deploykit.recipes.run import run_recipe

    recipe = Recipe.model_validate(data)
    started = time.perf_counter()
    row = _row(key, recipe)
    try:
        result = run_recipe(recipe)
        row.update(_from_report(load_report(result.run_dir)), run_dir=str(result.run_dir))
    except GateError as exc:
        row.update(status=FAILED, reason=str(exc))
        if isinstance(exc.run_dir, Path) and (exc.run_dir / "report.json").is_file():
            report = _from_report(load_report(exc.run_dir))
            row.update(report, status=FAILED, run_dir=str(exc.run_dir))
    except BackendUnavailableError as exc:
        row.update(status=UNAVAILABLE, reason=str(exc))
    except DeployKitError as exc:
        row.update(status=ERROR, reason=str(exc))
    row["seconds"] = round(time.perf_counter() - started, 2)
    return row


def _row(key: str, recipe: Recipe | None, status: str = "", reason: str = "") -> dict[str, Any]:
    return {
        "recipe": key,
        "model": recipe.model.ref if recipe else None,
        "target": recipe.target.backend if recipe else None,
        "precision": recipe.precision if recipe else None,
        "device": recipe.target.device if recipe else None,
        "status": status,
        "reason": reason,
        "run_dir": None,
        "latency_p50_ms": None,
        "speedup_vs_torch": None,
        "top1_drop_pt": None,
        "top1_agreement": None,
        "cosine": None,
        "artifact_bytes": None,
        "batch": None,
        "threads": recipe.target.threads if recipe else None,
        "seconds": None,
    }


def _from_report(report: Any) -> dict[str, Any]:
    """Summary numbers from a run's report.json."""
    latency = report.latency or {}
    fidelity = report.fidelity or {}
    drops = [
        float(r["drop"])
        for r in (report.accuracy or {}).values()
        if isinstance(r, dict) and r.get("drop") is not None
    ]
    compiled = [s for s in report.stages if s.name == "compile"]
    status = OK if report.status == "ok" else FAILED
    return {
        "status": status,
        "reason": "" if status == OK else report.status,
        "latency_p50_ms": latency.get("p50_ms"),
        "speedup_vs_torch": getattr(report, "speedup_vs_torch", None),
        "top1_drop_pt": max(drops) if drops else None,
        "top1_agreement": fidelity.get("top1_agreement"),
        "cosine": fidelity.get("cosine"),
        "artifact_bytes": compiled[-1].size_bytes if compiled else None,
        "batch": latency.get("batch", report.input.get("batch")),
        "threads": latency.get("threads"),
    }


class _LocalPool:
    """Bounded pool of worker processes, one per running recipe."""

    def __init__(self, workers: int, scratch: Path) -> None:
        self.workers = workers
        self.scratch = scratch
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.stopping = threading.Event()
        self.lock = threading.Lock()

    def run(self, item: SweepItem) -> dict[str, Any]:
        assert item.recipe is not None
        if self.stopping.is_set():
            return _row(item.key, item.recipe, INTERRUPTED, "the sweep was interrupted")
        name = f"{abs(hash(item.key)):x}"
        recipe_file = self.scratch / f"{name}.recipe.json"
        result_file = self.scratch / f"{name}.result.json"
        log_file = self.scratch / f"{name}.log"
        recipe_file.write_text(json.dumps(as_dict(item.recipe)), encoding="utf-8")
        command = [
            sys.executable,
            "-m",
            "deploykit.recipes.worker",
            str(recipe_file),
            str(result_file),
            item.key,
        ]
        started = time.perf_counter()
        with open(log_file, "wb") as log:
            with self.lock:
                if self.stopping.is_set():
                    return _row(item.key, item.recipe, INTERRUPTED, "the sweep was interrupted")
                proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
                self.procs[item.key] = proc
            code = proc.wait()
        with self.lock:
            self.procs.pop(item.key, None)
        if result_file.is_file():
            row: dict[str, Any] = json.loads(result_file.read_text(encoding="utf-8"))
            return row
        row = _row(item.key, item.recipe)
        row["seconds"] = round(time.perf_counter() - started, 2)
        if self.stopping.is_set() or code in (130, -signal.SIGINT):
            row.update(status=INTERRUPTED, reason="interrupted; no run folder was published")
        else:
            tail = log_file.read_text(errors="replace").strip().splitlines()[-1:] or [""]
            row.update(status=ERROR, reason=f"worker exited with {code}: {tail[0][:300]}")
        return row

    def stop(self) -> None:
        """Interrupt running workers (they remove their staging folders), then kill.

        A Ctrl-C in a terminal reaches the workers too; those still running after a
        moment (the sweep alone was signalled) get their own SIGINT.
        """
        self.stopping.set()
        with self.lock:
            procs = list(self.procs.values())
        settle = time.monotonic() + 3.0
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, settle - time.monotonic()))
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + _GRACE_SECONDS
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _precheck(item: SweepItem) -> dict[str, Any] | None:
    """A row for a recipe that cannot start here (invalid, or its backend is missing)."""
    from deploykit.backends.registry import get_backend

    if item.recipe is None:
        return _row(item.key, None, ERROR, item.error)
    availability = get_backend(item.recipe.target.backend).is_available()
    if not availability.ok:
        reason = f"target {item.recipe.target.backend} unavailable: {availability.message()}"
        return _row(item.key, item.recipe, UNAVAILABLE, reason)
    return None


def run_local(
    items: list[SweepItem], workers: int, progress: Progress = _no_progress
) -> list[dict[str, Any]]:
    """Run `items` on at most `workers` processes at once; rows in the items' order.

    Ctrl-C interrupts the running workers, marks what did not finish as interrupted and
    re-raises KeyboardInterrupt after the rows are known (see :func:`sweep`).
    """
    rows: dict[str, dict[str, Any]] = {}
    todo = []
    for item in items:
        early = _precheck(item)
        if early is not None:
            rows[item.key] = early
            progress(early, len(rows), len(items))
        else:
            todo.append(item)
    with tempfile.TemporaryDirectory(prefix="deploykit-sweep-") as scratch:
        pool = _LocalPool(workers, Path(scratch))
        executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sweep")
        futures: dict[Future[dict[str, Any]], SweepItem] = {
            executor.submit(pool.run, item): item for item in todo
        }
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                for future in done:
                    row = future.result()
                    rows[row["recipe"]] = row
                    progress(row, len(rows), len(items))
        except KeyboardInterrupt:
            previous = _ignore_sigint()
            try:
                pool.stop()
                executor.shutdown(wait=True, cancel_futures=True)
            finally:
                if previous is not None:
                    signal.signal(signal.SIGINT, previous)
            for future, item in futures.items():
                if future.done() and not future.cancelled():
                    rows[item.key] = future.result()
                else:
                    rows[item.key] = _row(
                        item.key, item.recipe, INTERRUPTED, "the sweep was interrupted"
                    )
            raise SweepInterrupted([rows[i.key] for i in items]) from None
        executor.shutdown(wait=True)
    return [rows[item.key] for item in items]


def _ignore_sigint() -> Any:
    """Ignore further Ctrl-C while stopping (main thread only); returns the old handler."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGINT, signal.SIG_IGN)


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C during a sweep; carries the rows known at that point."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        super().__init__("sweep interrupted")
        self.rows = rows


def run_ray(
    items: list[SweepItem], address: str | None, progress: Progress = _no_progress
) -> list[dict[str, Any]]:
    """Run each recipe as a Ray task (``num_gpus=1`` for GPU recipes); rows in order.

    GPU recipes are submitted only when the cluster has a GPU, and Ray places them on a
    node that has one; otherwise they are reported unavailable, with the reason.
    """
    try:
        import ray
    except ImportError:
        raise UserError(
            "the ray executor needs Ray: pip install 'deploykit[ray]'; or use --executor local"
        ) from None
    started = not ray.is_initialized()
    if started:
        if address:  # an existing cluster: its nodes need deploykit installed
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(include_dashboard=False, log_to_driver=False)
    try:
        return _gather_ray(ray, items, progress)
    finally:
        if started:
            ray.shutdown()


def _gather_ray(ray: Any, items: list[SweepItem], progress: Progress) -> list[dict[str, Any]]:
    """Submit the recipes as Ray tasks and gather their rows (Ray is initialised)."""
    cluster_gpus = float(ray.cluster_resources().get("GPU", 0))
    node_cpus = max(
        (float(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")), default=0.0
    )
    remote = ray.remote(max_retries=0)(run_one)
    rows: dict[str, dict[str, Any]] = {}
    refs: dict[Any, SweepItem] = {}
    for item in items:
        if item.recipe is not None and item.needs_gpu:
            # Checked on the GPU node that runs it; none in the cluster: not submitted.
            early = (
                _row(
                    item.key,
                    item.recipe,
                    UNAVAILABLE,
                    f"no GPU in the Ray cluster ({item.recipe.target.backend} "
                    f"{item.recipe.target.device} needs one); not submitted",
                )
                if cluster_gpus < 1
                else None
            )
        else:
            early = _precheck(item)
        threads = item.recipe.target.threads or 1 if item.recipe is not None else 1
        if early is None and threads > node_cpus:
            # A task no node can hold would wait forever.
            early = _row(
                item.key,
                item.recipe,
                UNAVAILABLE,
                f"needs {threads} CPUs on one node; the largest Ray node has {node_cpus:g} "
                "(lower target.threads or --threads)",
            )
        if early is not None:
            rows[item.key] = early
            progress(early, len(rows), len(items))
            continue
        assert item.recipe is not None
        task = remote.options(
            num_cpus=threads,
            num_gpus=1 if item.needs_gpu else 0,
            name=f"deploykit:{item.key}",
        )
        refs[task.remote(as_dict(item.recipe), item.key)] = item
    pending = list(refs)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=1.0)
            for ref in done:
                item = refs[ref]
                try:
                    row = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    row = _row(item.key, item.recipe, ERROR, f"Ray task failed: {exc}"[:400])
                rows[item.key] = row
                progress(row, len(rows), len(items))
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref)
        for ref in pending:
            item = refs[ref]
            rows[item.key] = _row(item.key, item.recipe, INTERRUPTED, "the sweep was interrupted")
        raise SweepInterrupted([rows[i.key] for i in items]) from None
    return [rows[item.key] for item in items]


def add_speedups(rows: list[dict[str, Any]]) -> None:
    """Fill ``speedup_vs_torch`` from a torch-fp32 row of the same model, batch and threads."""
    eager = {
        (r["model"], r["batch"], r["threads"]): r["latency_p50_ms"]
        for r in rows
        if r["status"] == OK and r["target"] == "torch" and r["precision"] == "fp32"
    }
    for row in rows:
        base = eager.get((row["model"], row["batch"], row["threads"]))
        if row["speedup_vs_torch"] is None and base and row["latency_p50_ms"]:
            row["speedup_vs_torch"] = round(base / row["latency_p50_ms"], 3)


def sweep(
    paths: list[str], options: SweepOptions, progress: Progress = _no_progress
) -> dict[str, Any]:
    """Run every recipe under `paths` and summarise.

    Returns:
        The summary (``rows`` in recipe order, ``counts`` per status, wall time).

    Raises:
        SweepInterrupted: Ctrl-C; carries the summary so far as ``rows``.
        UserError: No recipes, bad options, Ray missing.
    """
    if options.executor not in ("local", "ray"):
        raise UserError(f"--executor must be local or ray, not {options.executor!r}")
    items = prepare(paths, options)
    started = time.perf_counter()
    if options.executor == "ray":
        rows = run_ray(items, options.address, progress)
    else:
        rows = run_local(items, options.workers, progress)
    return summarise(rows, options, time.perf_counter() - started)


def summarise(rows: list[dict[str, Any]], options: SweepOptions, wall: float) -> dict[str, Any]:
    """The sweep summary document (also what ``--json`` prints)."""
    from deploykit.harness.environment import cpu_info

    add_speedups(rows)
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    return {
        "schema_version": 1,
        "kind": "sweep",
        "executor": options.executor,
        "workers": options.workers if options.executor == "local" else None,
        "overrides": list(options.overrides),
        "wall_seconds": round(wall, 2),
        "device": cpu_info(),
        "counts": counts,
        "rows": rows,
    }


def exit_code(summary: dict[str, Any]) -> int:
    """0 when nothing failed (unavailable ones are reported, not failures);
    1 when a gate failed; 2 when a recipe was invalid or a run hit bad input."""
    statuses = {r["status"] for r in summary["rows"]}
    if ERROR in statuses:
        return 2
    return 1 if FAILED in statuses else 0


def planned_run_dirs(items: list[SweepItem]) -> dict[str, str]:
    """Where each recipe will write (for --dry-run)."""
    return {i.key: str(run_dir_of(i.recipe)) for i in items if i.recipe is not None}

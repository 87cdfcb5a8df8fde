"""One sweep run in its own process: ``python -m deploykit.recipes.worker RECIPE RESULT``.

Reads a resolved recipe, runs it, and writes the summary row to RESULT (atomically).
Interrupted (SIGINT), it writes nothing: export removes its staging folder, so no
half-written run folder is left behind, and the sweep marks the recipe interrupted.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path


def _interrupt_once(signum: int, frame: object) -> None:
    """First SIGINT interrupts the run; later ones are ignored so its cleanup finishes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def main(argv: list[str]) -> int:
    """Entry point; returns the process exit code."""
    from deploykit.fsutil import write_json_atomic

    signal.signal(signal.SIGINT, _interrupt_once)
    from deploykit.recipes.sweep import run_one

    recipe_file, result_file, key = argv
    try:
        data = json.loads(Path(recipe_file).read_text(encoding="utf-8"))
        row = run_one(data, key)
    except KeyboardInterrupt:
        return 130
    write_json_atomic(Path(result_file), row)
    return 0


if __name__ == "__main__":  # pragma: no cover - run as a subprocess
    sys.exit(main(sys.argv[1:]))

#!/usr/bin/env bash
# Create .venv (once) with deploykit, PyTorch, the CPU runtimes and the dev tools.
# Idempotent: re-running only installs what pyproject.toml asks for and is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${DEPLOYKIT_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.deploykit-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -e '.[torch,cpu,dev]'
    echo "$want" > "$stamp"
fi

#!/usr/bin/env bash
# Create .venv (once) with deploykit, PyTorch, the CPU runtimes and the dev tools.
# Idempotent: re-running only installs what pyproject.toml asks for and is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
# Fashion-MNIST (MIT) from Debian, for the trained seed networks' accuracy checks.
FMNIST=/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
if [ ! -f "$FMNIST" ] && command -v apt-get >/dev/null; then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
        || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null; } \
        || echo "setup: could not install Debian's dataset-fashion-mnist; Fashion-MNIST checks will skip" >&2
fi
PYTHON="${PYTHON:-python3}"
VENV="${DEPLOYKIT_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.deploykit-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -e '.[torch,cpu,data,dev]'
    echo "$want" > "$stamp"
fi

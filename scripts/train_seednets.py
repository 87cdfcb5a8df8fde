"""Train the seed-family networks on Fashion-MNIST and write their weights and logs.

Reproducible by construction: one CPU thread, deterministic algorithms, a fixed
seed for initialisation, data order and augmentation. The images are
preprocessed once with deploykit's own `preprocess` and the models' input
contract (28x28 -> 32x32 bilinear, normalised), exactly as deploykit feeds them
at evaluation time.

Usage:
    .venv/bin/python scripts/train_seednets.py            # all five
    .venv/bin/python scripts/train_seednets.py fmnist_lenet5 fmnist_resnet

Writes ``deploykit/models/weights/<name>.pt`` (a plain state_dict) and
``<name>.log.json`` (seed, hyper-parameters, per-epoch curve, test accuracy,
time, versions, data sha256s). The digests and accuracies printed at the end are
the values pinned in ``deploykit/models/seednets.py``.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deploykit.fsutil import sha256_file, write_bytes_atomic, write_json_atomic
from deploykit.harness import fashion_mnist
from deploykit.harness.datasets import preprocess
from deploykit.models.seednets import FASHION_MNIST_CONTRACT, SEEDNETS, WEIGHTS_DIR

DEFAULT_SEED = 20_240_601
# tests/test_seednets.py checks the shipped weights on the first 2,000 test images.
FIRST_TEST = 2_000


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run.

    Attributes:
        epochs: Passes over the 60,000 training images.
        batch_size: Images per step.
        lr: Peak learning rate of the one-cycle schedule (AdamW).
        weight_decay: AdamW weight decay.
        label_smoothing: Cross-entropy label smoothing.
        pad: Random-crop padding in pixels (0: no crop augmentation).
        flip: Random horizontal flips.
        warmup: Fraction of the steps spent warming the learning rate up.
    """

    epochs: int
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    pad: int = 0
    flip: bool = True
    warmup: float = 0.2


# Few epochs fit the ~15-minute single-thread budget. Random crops (pad) only help the
# BatchNorm-free LeNet-5 at this length; the others train with flips alone.
CONFIGS: dict[str, TrainConfig] = {
    "fmnist_lenet5": TrainConfig(epochs=15, pad=2),
    "fmnist_mobilenet_v1": TrainConfig(epochs=6),
    "fmnist_shufflenet_v1": TrainConfig(epochs=6),
    "fmnist_squeezenet": TrainConfig(epochs=6),
    "fmnist_resnet": TrainConfig(epochs=6),
}


def load_split(split: fashion_mnist.Split) -> tuple[torch.Tensor, torch.Tensor]:
    """One split preprocessed by the seed networks' input contract.

    Each 28x28 image goes through `preprocess` as an RGB (gray, three equal channels)
    image, the form a decoded image file takes, so training sees what evaluation sees.

    Returns:
        (N, 1, 32, 32) float32 inputs and (N,) int64 labels.
    """
    images, labels = fashion_mnist.load(split)
    inputs = np.stack(
        [
            preprocess(np.repeat(image[:, :, None], 3, axis=2), FASHION_MNIST_CONTRACT)
            for image in images
        ]
    )
    return torch.from_numpy(inputs), torch.from_numpy(labels)


def augment(batch: torch.Tensor, config: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """Random crop from a background-padded image and random horizontal flip, per sample."""
    n, _, height, width = batch.shape
    if config.pad:
        background = (0.0 - FASHION_MNIST_CONTRACT.mean[0]) / FASHION_MNIST_CONTRACT.std[0]
        padded = F.pad(batch, (config.pad,) * 4, value=background)
        dy = torch.randint(0, 2 * config.pad + 1, (n, 1, 1), generator=generator)
        dx = torch.randint(0, 2 * config.pad + 1, (n, 1, 1), generator=generator)
        rows = dy + torch.arange(height).view(1, height, 1)
        cols = dx + torch.arange(width).view(1, 1, width)
        batch = padded[torch.arange(n).view(n, 1, 1), 0, rows, cols].unsqueeze(1)
    if config.flip:
        flip = torch.rand(n, generator=generator) < 0.5
        batch = torch.where(flip.view(n, 1, 1, 1), batch.flip(3), batch)
    return batch


@torch.no_grad()
def evaluate(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> int:
    """Number of correct top-1 predictions, in eval mode."""
    model.eval()
    correct = 0
    for start in range(0, len(inputs), 1000):
        logits = model(inputs[start : start + 1000])
        correct += int((logits.argmax(1) == labels[start : start + 1000]).sum())
    return correct


def train(
    name: str,
    model: nn.Module,
    config: TrainConfig,
    data: dict[str, tuple[torch.Tensor, torch.Tensor]],
    seed: int,
) -> dict[str, Any]:
    """Train `model` in place and return the log (curve, accuracy, time)."""
    train_x, train_y = data["train"]
    test_x, test_y = data["test"]
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(train_x) / config.batch_size)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=config.lr,
        epochs=config.epochs,
        steps_per_epoch=steps_per_epoch,
        pct_start=config.warmup,
    )
    curve = []
    started = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        model.train()
        order = torch.randperm(len(train_x), generator=generator)
        total_loss, seen, correct = 0.0, 0, 0
        for start in range(0, len(order), config.batch_size):
            index = order[start : start + config.batch_size]
            inputs = augment(train_x[index], config, generator)
            logits = model(inputs)
            loss = F.cross_entropy(logits, train_y[index], label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += float(loss.detach()) * len(index)
            seen += len(index)
            correct += int((logits.argmax(1) == train_y[index]).sum())
        test_correct = evaluate(model, test_x, test_y)
        row = {
            "epoch": epoch,
            "train_loss": round(total_loss / seen, 5),
            "train_accuracy": round(100.0 * correct / seen, 3),
            "test_accuracy": round(100.0 * test_correct / len(test_x), 2),
            "seconds": round(time.perf_counter() - started, 1),
        }
        curve.append(row)
        print(f"{name} {json.dumps(row)}", flush=True)
    seconds = time.perf_counter() - started
    test_correct = evaluate(model, test_x, test_y)
    first_correct = evaluate(model, test_x[:FIRST_TEST], test_y[:FIRST_TEST])
    return {
        "curve": curve,
        "test_correct": test_correct,
        "test_count": len(test_x),
        "test_accuracy": round(100.0 * test_correct / len(test_x), 2),
        f"test_accuracy_first_{FIRST_TEST}": round(100.0 * first_correct / FIRST_TEST, 2),
        "train_seconds": round(seconds, 1),
    }


def save_weights(model: nn.Module, path: Path) -> None:
    """Write the float32 state_dict with torch.save, atomically."""
    state = {key: value.detach().clone().contiguous() for key, value in model.state_dict().items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes_atomic(path, buffer.getvalue())
    path.chmod(0o644)  # shipped in the repository and the wheel


def run(
    name: str,
    seed: int,
    out: Path,
    data: dict[str, tuple[torch.Tensor, torch.Tensor]],
    data_sha256: dict[str, str],
    epochs: int | None,
) -> dict[str, Any]:
    """Build, train and save one network; return its log."""
    net = SEEDNETS[name]
    config = CONFIGS[name]
    if epochs is not None:
        config = TrainConfig(**{**asdict(config), "epochs": epochs})
    torch.manual_seed(seed)
    model = net.build()
    result = train(name, model, config, data, seed)
    weights = out / f"{name}.pt"
    save_weights(model, weights)
    log = {
        "name": name,
        "family": net.family,
        "architecture": net.cls.__name__,
        "architecture_kwargs": net.kwargs,
        "num_params": sum(p.numel() for p in model.parameters()),
        "seed": seed,
        "hyper_parameters": {
            **asdict(config),
            "optimizer": "AdamW",
            "schedule": "OneCycleLR (cosine annealing)",
            "loss": "cross-entropy",
            "augmentation": "horizontal flip p=0.5"
            + (f", random {config.pad}-pixel shift (background padding)" if config.pad else ""),
            "data_order": "torch.randperm per epoch from torch.Generator().manual_seed(seed)",
        },
        "preprocess": {
            "function": "deploykit.harness.datasets.preprocess",
            "contract": FASHION_MNIST_CONTRACT.to_dict(),
        },
        **result,
        "weights_file": weights.name,
        "weights_sha256": sha256_file(weights),
        "weights_bytes": weights.stat().st_size,
        "data": {
            "train": "fashion-mnist-train (60,000)",
            "test": "fashion-mnist-test (10,000)",
            "sha256": data_sha256,
        },
        "environment": {
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "threads": torch.get_num_threads(),
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        },
        "command": " ".join(["python scripts/train_seednets.py", *sys.argv[1:]]),
    }
    log_file = out / f"{name}.log.json"
    write_json_atomic(log_file, log)
    log_file.chmod(0o644)
    return log


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "names", nargs="*", help=f"networks to train (default: all): {', '.join(SEEDNETS)}"
    )
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="output folder")
    parser.add_argument("--epochs", type=int, default=None, help="override (for experiments)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(SEEDNETS))
    if unknown:
        parser.error(f"unknown network(s) {', '.join(unknown)}; choose from {', '.join(SEEDNETS)}")
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    started = time.perf_counter()
    data = {split: load_split(split) for split in ("train", "test")}
    data_sha256 = {**fashion_mnist.sha256("train"), **fashion_mnist.sha256("test")}
    print(f"preprocessed 70,000 images in {time.perf_counter() - started:.1f} s", flush=True)
    logs = [
        run(name, args.seed, args.out, data, data_sha256, args.epochs)
        for name in args.names or list(SEEDNETS)
    ]
    for log in logs:
        print(
            f"{log['name']:22s} params={log['num_params']:7d} test={log['test_accuracy']:.2f}% "
            f"train={log['train_seconds']:.0f}s sha256={log['weights_sha256']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

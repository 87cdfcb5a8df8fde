"""Write the dataset manifests under calibration/ from the installed packages.

Run after `bash scripts/setup.sh` (it needs the `data` extra and Debian's
dataset-fashion-mnist). The manifests record every source file's sha256, so a
different package version is detected when the data is loaded.

    .venv/bin/python scripts/make_manifests.py
"""

from __future__ import annotations

import json
import re
import sys

from deploykit.fsutil import sha256_file
from deploykit.harness import fashion_mnist
from deploykit.harness.evalsets import Manifest, SourceFile, manifest_dir, origin_root

# Natural photos, split BY SOURCE PHOTO into a calibration pool and an evaluation pool.
CALIB_PHOTOS = (
    ("pypi:skimage", "data/astronaut.png"),
    ("pypi:skimage", "data/rocket.jpg"),
    ("pypi:skimage", "data/hubble_deep_field.jpg"),
    ("pypi:sklearn", "datasets/images/china.jpg"),
)
EVAL_PHOTOS = (
    ("pypi:skimage", "data/chelsea.png"),
    ("pypi:skimage", "data/coffee.png"),
    ("pypi:sklearn", "datasets/images/flower.jpg"),
    ("pypi:matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
)
AUGMENT = {"per_image": 64, "seed": 0, "crop_scale": [0.25, 1.0], "flip": 0.5, "jitter": 0.3}
PHOTO_LICENCE = (
    "scikit-image sample data (astronaut, rocket, hubble_deep_field: public domain; chelsea, "
    "coffee: CC0; per skimage.data docstrings), scikit-learn sample images china.jpg and "
    "flower.jpg (CC-BY 2.0, sklearn/datasets/images/README.txt), matplotlib "
    "grace_hopper.jpg (public domain, US Navy photo)"
)


def _source(origin: str, path: str, label: int | None = None) -> SourceFile:
    return SourceFile(origin, path, sha256_file(origin_root(origin) / path), label)


def manifests() -> list[Manifest]:
    """Every shipped set."""
    foolbox = origin_root("pypi:foolbox")
    photos = sorted((foolbox / "data").glob("imagenet_*.jpg"))
    labelled = [
        _source("pypi:foolbox", f"data/{p.name}", int(re.findall(r"_(\d+)\.jpg$", p.name)[0]))
        for p in photos
    ]
    sets = [
        Manifest(
            name="imagenet-photos20",
            description="20 real ImageNet photos with their class index (foolbox 3.3.4 data)",
            role="eval",
            kind="files",
            labels="imagenet1k",
            licence="foolbox MIT; the photos come from ImageNet (research and education use)",
            files=tuple(labelled),
        ),
        Manifest(
            name="imagenet-photos20-views",
            description="the 20 labelled ImageNet photos x 32 augmented views, each view keeping "
            "its photo's label: 640 inputs from 20 independent photos, for figures the 20 "
            "photos alone cannot resolve; no photo is shared with natural-images-calib",
            role="eval",
            kind="augmented",
            labels="imagenet1k",
            licence="foolbox MIT; the photos come from ImageNet (research and education use)",
            files=tuple(labelled),
            params=dict(AUGMENT, per_image=32, seed=1),
            disjoint_from=("natural-images-calib",),
        ),
        Manifest(
            name="natural-images",
            description="4 unlabelled natural photos x 64 augmented views, scored as "
            "agreement with the FP32 model; no photo is shared with natural-images-calib",
            role="eval",
            kind="augmented",
            labels="",
            licence=PHOTO_LICENCE,
            files=tuple(_source(o, p) for o, p in EVAL_PHOTOS),
            params=dict(AUGMENT, seed=1),
            disjoint_from=("natural-images-calib",),
        ),
        Manifest(
            name="natural-images-calib",
            description="4 unlabelled natural photos x 64 augmented views for INT8 calibration "
            "of ImageNet models; no photo is shared with natural-images",
            role="calib",
            kind="augmented",
            labels="",
            licence=PHOTO_LICENCE,
            files=tuple(_source(o, p) for o, p in CALIB_PHOTOS),
            params=dict(AUGMENT, seed=0),
            disjoint_from=("natural-images",),
        ),
    ]
    for split, role, other in (("test", "eval", "train"), ("train", "calib", "test")):
        images, labels = fashion_mnist.files(split)
        sets.append(
            Manifest(
                name=f"fashion-mnist-{split}",
                description=f"Fashion-MNIST official {split} split "
                f"({fashion_mnist.SPLIT_SIZES[split]} 28x28 images), Debian dataset-fashion-mnist",
                role=role,
                kind="idx",
                labels="fashion-mnist",
                licence="MIT (Zalando Research)",
                files=tuple(
                    _source("debian:dataset-fashion-mnist", p.name) for p in (images, labels)
                ),
                params={"split": split, "count": fashion_mnist.SPLIT_SIZES[split]},
                disjoint_from=(f"fashion-mnist-{other}",),
            )
        )
    return sets


def main() -> int:
    """Write every manifest; print what was written."""
    folder = manifest_dir()
    folder.mkdir(parents=True, exist_ok=True)
    for manifest in manifests():
        path = folder / f"{manifest.name}.json"
        path.write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
        print(f"{path}: {manifest.size()} inputs, sha256 {manifest.sha256[:16]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

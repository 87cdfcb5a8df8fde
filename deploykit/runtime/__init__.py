"""The device runtime: load a ``.dkb`` bundle and run it without PyTorch.

    from deploykit.runtime import load
    model = load("mobilenet_v2.dkb")
    print(model.predict(image))      # class scores; model.top_k(image) for labels

Imports numpy and the standard library; Pillow when an image is preprocessed, and
the bundle's runtime (onnxruntime, openvino or tensorrt) when it is loaded.
"""

from deploykit.package.archive import BundleError
from deploykit.runtime.model import Model, Prediction, compare_outputs, from_bundle, load

__all__ = ["BundleError", "Model", "Prediction", "compare_outputs", "from_bundle", "load"]

"""Pipeline stages: each takes an artifact and options and returns a new artifact."""

# The INT8 calibration methods (deploykit.stages.calibrate), here so that the CLI can
# offer them without importing the stage and its numpy/onnx dependencies.
CALIBRATION_METHODS = ("minmax", "entropy", "percentile", "mse")

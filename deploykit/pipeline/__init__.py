"""The runs behind :mod:`deploykit.api`: each module composes the stages into one command.

``export`` (export -> fuse -> [calibrate] -> compile -> accuracy -> fidelity -> latency),
``int8`` (the calibration, quantization, accuracy and fallback stages), ``evaluate``
(a run folder's artifact on a data set) and ``records`` (what every stage writes into a
report). :mod:`deploykit.api` is the stable entry point; these modules may change.
"""

"""Edge bundles: one verifiable file with the model artifact, its input contract and proof.

Submodules (import them directly; this package imports nothing on purpose, so the
device runtime can use :mod:`deploykit.package.archive` without pulling in pydantic):

- :mod:`~deploykit.package.archive`: safe reading, extraction and atomic writing of
  ``.dkb`` archives (standard library only);
- :mod:`~deploykit.package.manifest`: the versioned, validated manifest schema;
- :mod:`~deploykit.package.formats`: one builder per bundle format;
- :mod:`~deploykit.package.build`, :mod:`~deploykit.package.verify`: package, verify, inspect.
"""

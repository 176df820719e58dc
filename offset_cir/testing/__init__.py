"""Test doubles used by the tests and the benchmarks (as transformers' ``testing_utils``), never by the library.

They live in the package, not in ``tests/``, because the scripts in ``benchmarks/`` need them too:

- :mod:`offset_cir.testing.placeholders`: 8x8 images whose pixels spell a code, written at a benchmark's own paths,
  and ``CodePreprocess``, a stand-in for the model's preprocessing that keeps those pixels;
- :mod:`offset_cir.testing.oracle`: models that follow the model interface and read those codes (a perfect or
  reversed ``OracleModel``, a ``HashModel`` for timing);
- :mod:`offset_cir.testing.masks`: tiny random captioner and segmenter folders (BLIP, BLIP-2, CLIPSeg) for the mask
  pipeline, built offline;
- :mod:`offset_cir.testing.search`: ``PixelModel``, a stand-in model that projects pixels (for the search index and
  service), generated image galleries, and the tiny OFFSET trained a few steps on the synthetic benchmark;
- :mod:`offset_cir.testing.service`: the search service's server in a thread, and reading one metric;
- :mod:`offset_cir.testing.memory`: the peak resident memory of a call or of an ``offset`` command (what PIL and
  torch allocate, which ``tracemalloc`` does not see);
- :mod:`offset_cir.testing.training`: a trainer callback that interrupts a run at a chosen step, and an
  evaluation that returns scripted selection scores.

Importing this package imports none of them (each pulls in torch or transformers); import the module you need.
"""

"""Benchmarks of the pipeline's hot paths (not tests: they measure speed, they never assert it).

* ``python -m bench.attention``  — attention mask kernels: FlexAttention ``BlockMask`` vs SDPA with a dense mask;
* ``python -m bench.train_step`` — one training step of an AKI size (random init): samples/s, tokens/s, MFU,
  peak memory, for PT and for SFT padded vs packed;
* ``python -m bench.loader``     — MDS → decoded tensors → packed batch, vs a plain webdataset loader;
* ``python -m bench.prep``       — ≤720p JPEG → 384 JPEG → tokens → MDS, vs a plain webdataset writer.

Each writes ``bench/results/<name>.json`` and refreshes the table in ``bench/results/README.md``
(:mod:`bench.common`); the goals the figures are compared with live in :data:`bench.common.GOALS`.
"""

"""Evaluation: benchmark readers, answer extraction, metrics and the CLIs.

* :mod:`pipeline.eval.cv_bench` — ``python -m pipeline.eval.cv_bench`` (CV-Bench 2D/3D accuracy);
* :mod:`pipeline.eval.pope` — ``python -m pipeline.eval.pope`` (POPE accuracy/precision/recall/F1);
* :mod:`pipeline.eval.readers` — the released file formats; :mod:`pipeline.eval.answers` — extraction;
* :mod:`pipeline.eval.metrics` — scores; :mod:`pipeline.eval.runner` — batched, sharded generation;
* :mod:`pipeline.eval.lmms` — the lmms-eval model ``aki`` (registered by :mod:`pipeline.eval.lmms_plugin`);
* :mod:`pipeline.eval.paper` — ``python -m pipeline.eval.paper``: the paper's twelve benchmarks and table.
"""

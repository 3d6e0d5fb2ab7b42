"""Evaluation: benchmark readers, answer extraction, metrics and the CLIs.

* :mod:`pipeline.eval.cv_bench` — ``python -m pipeline.eval.cv_bench`` (CV-Bench 2D/3D accuracy);
* :mod:`pipeline.eval.pope` — ``python -m pipeline.eval.pope`` (POPE accuracy/precision/recall/F1);
* :mod:`pipeline.eval.readers` — the released file formats; :mod:`pipeline.eval.answers` — extraction;
* :mod:`pipeline.eval.metrics` — scores; :mod:`pipeline.eval.runner` — batched, sharded generation.
"""

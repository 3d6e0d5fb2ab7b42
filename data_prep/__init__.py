"""Data preparation: raw datasets → MDS shards that follow the token contract (DESIGN.md).

* :mod:`data_prep.pretrain` — img2dataset webdataset tars (BLIP3-Kale, BLIP3-OCR-200m) → PT shards;
* :mod:`data_prep.sft` — one parser per SFT source (its original files) → one MDS dataset per source;
* :mod:`data_prep.mixture` — ``mixture.yaml`` (Table 4 sampling ratios) written here, read by training
  (:mod:`pipeline.data.mixture`);
* :mod:`data_prep.synthetic` — a procedurally drawn "world" emitted in the real raw formats.

Every dataset folder holds MDS shards plus ``manifest.json`` (:class:`pipeline.data.format.Manifest`).
"""

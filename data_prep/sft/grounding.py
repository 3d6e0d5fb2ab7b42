"""Region-description sources: RefCOCO, RefCOCO+, RefCOCOg and Visual Genome.

The paper trains region → phrase only: the input is ``Provide a short description for this region.
<bbox>[x1, y1][x2, y2]</bbox>`` (coordinates normalised by the original image size, 3 decimals, clamped
to [0, 1]; clamped boxes are counted in the manifest) and the answer is the referring phrase.

RefCOCO-family datasets are read from either of their two distributions:

* MDETR's ``finetune_refcoco*_train.json`` (path key ``mdetr``): COCO-style, one ``images`` entry per
  sentence carrying the ``caption``, its box in ``annotations`` with the same ``image_id``;
* the original ``refs(*).p`` + ``instances.json`` (path keys ``refs`` and ``instances``). The pickle is
  loaded only through :func:`data_prep.safe_pickle.load_plain_pickle`, which refuses anything but
  plain data.
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Iterator

from data_prep.records import Parsed
from data_prep.safe_pickle import load_plain_pickle
from data_prep.sft.common import (CLAMPED_BOX, Paths, SftOptions, SftSource, first_existing, format_bbox,
                                  load_json, sft_sample, text)
from pipeline.templates import task_input


def _region_sample(sample_id: str, image: str, box: list, width: float, height: float, phrase: Any):
    bbox, clamped = format_bbox(*[float(v) for v in box], float(width), float(height))
    return sft_sample(sample_id, [image], [(task_input("region_description", bbox=bbox), text(phrase, "phrase"))],
                      flags=[CLAMPED_BOX] if clamped else [])


# --- RefCOCO / RefCOCO+ / RefCOCOg --------------------------------------------------------------------
def refcoco_records(paths: Paths) -> Iterator[tuple[str, Any]]:
    if "mdetr" in paths:
        data = load_json(paths["mdetr"], "MDETR finetune_refcoco*_train.json")
        boxes = {a.get("image_id"): a for a in data["annotations"] if isinstance(a, dict)}
        for i, img in enumerate(data["images"]):
            key = img.get("id") if isinstance(img, dict) else None
            yield str(key if key is not None else f"#{i}"), {"image": img, "annotation": boxes.get(key)}
        return
    if "refs" not in paths or "instances" not in paths:
        raise ValueError("RefCOCO sources need either `mdetr` (finetune_refcoco*_train.json) or both `refs` "
                         "(refs(unc).p / refs(umd).p) and `instances` (instances.json)")
    refs = load_plain_pickle(paths["refs"])
    coco = load_json(paths["instances"], "COCO instances.json of the RefCOCO dataset")
    images = {im["id"]: im for im in coco["images"]}
    anns = {a["id"]: a for a in coco["annotations"]}
    for i, ref in enumerate(refs):
        rid = ref.get("ref_id", f"#{i}") if isinstance(ref, dict) else f"#{i}"
        yield str(rid), {"ref": ref, "images": images, "anns": anns}


def refcoco_samples(record_id: str, raw: dict, paths: Paths, options: SftOptions) -> Iterable[Parsed]:
    if "ref" not in raw:                    # MDETR entry
        img, ann = raw["image"], raw["annotation"]
        if ann is None:
            raise KeyError(f"no annotation with image_id {record_id}")
        image = os.path.join(paths["images"], img["file_name"])
        return [_region_sample(record_id, image, ann["bbox"], img["width"], img["height"], img["caption"])]
    ref = raw["ref"]
    if ref["split"] != options.split:
        return []
    img, ann = raw["images"][ref["image_id"]], raw["anns"][ref["ann_id"]]
    image = os.path.join(paths["images"], img["file_name"])
    return [_region_sample(f"{record_id}-{s['sent_id']}", image, ann["bbox"], img["width"], img["height"],
                           s["sent"]) for s in ref["sentences"]]


# --- Visual Genome: region_descriptions.json + image_data.json ----------------------------------------
# The images ship as two archives unpacking to VG_100K/ and VG_100K_2/; an image is looked up in either
# (or in the ``images`` folder itself, for users who merged the two).
VG_IMAGE_FOLDERS = ("VG_100K", "VG_100K_2", "")


def vg_records(paths: Paths) -> Iterator[tuple[str, Any]]:
    image_data = load_json(paths["image_data"], "Visual Genome image_data.json")
    sizes = {im.get("image_id", im.get("id")): im for im in image_data if isinstance(im, dict)}
    for entry in load_json(paths["regions"], "Visual Genome region_descriptions.json"):
        image_id = entry.get("id", entry.get("image_id")) if isinstance(entry, dict) else None
        regions = entry.get("regions") if isinstance(entry, dict) else None
        if not isinstance(regions, list):
            yield str(image_id), {"error": "entry has no `regions` list"}
            continue
        for j, region in enumerate(regions):
            rid = region.get("region_id", region.get("id", f"#{j}")) if isinstance(region, dict) else f"#{j}"
            yield f"{image_id}-{rid}", {"region": region, "image_id": image_id, "image": sizes.get(image_id)}


def vg_samples(record_id: str, raw: dict, paths: Paths, options: SftOptions) -> Iterable[Parsed]:
    if "error" in raw:
        raise ValueError(raw["error"])
    if raw["image"] is None:
        raise KeyError(f"image {raw['image_id']} is not in image_data.json")
    r, size = raw["region"], raw["image"]
    name = f"{raw['image_id']}.jpg"
    image = first_existing([os.path.join(paths["images"], folder, name) for folder in VG_IMAGE_FOLDERS])
    return [_region_sample(record_id, image, [r["x"], r["y"], r["width"], r["height"]], size["width"],
                           size["height"], r["phrase"])]


_REFCOCO_FILES = {"images": "COCO train2014 folder"}
_REFCOCO_OPTIONAL = {"mdetr": "finetune_refcoco*_train.json", "refs": "refs(unc).p / refs(umd).p",
                     "instances": "instances.json"}
_REFCOCO_LICENSE = ("{}: refer API Apache-2.0, annotation licence unverified (MDETR annotations unverified); "
                    "COCO images")

SOURCES = [
    *(SftSource(name, _REFCOCO_LICENSE.format(title), _REFCOCO_FILES, refcoco_records, refcoco_samples,
                _REFCOCO_OPTIONAL)
      for name, title in (("refcoco", "RefCOCO"), ("refcoco+", "RefCOCO+"), ("refcocog", "RefCOCOg"))),
    SftSource("vg", "Visual Genome: CC BY 4.0 (unverified)",
              {"regions": "region_descriptions.json", "image_data": "image_data.json",
               "images": "folder holding VG_100K/ and VG_100K_2/ as released (or the two merged, flat)"},
              vg_records, vg_samples),
]

"""Writers of tiny fixtures in the datasets' real file formats (see shared DATA_FORMATS.md).

Images are solid-colour squares so a test can check that what comes back is the same picture.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import tarfile

import numpy as np
from PIL import Image

RGB = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}


def jpeg(color: str = "red", size: int = 16, fmt: str = "JPEG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (size, size), RGB[color]).save(out, format=fmt)
    return out.getvalue()


def write_image(path: str, color: str = "red", fmt: str = "JPEG") -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(jpeg(color, fmt=fmt))
    return path


def mean_rgb(jpeg_bytes: bytes) -> tuple[int, int, int]:
    arr = np.asarray(Image.open(io.BytesIO(jpeg_bytes)).convert("RGB"), dtype=np.float64)
    return tuple(int(round(v)) for v in arr.reshape(-1, 3).mean(0))


def write_json(path: str, obj) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)
    return path


def write_tar(path: str, members: list[tuple[str, bytes]], cut_inside: str | None = None) -> str:
    """A tar of ``(name, data)`` members; ``cut_inside`` names a member the file ends halfway through."""
    buf = io.BytesIO()
    keep = None
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            if name == cut_inside:
                keep = buf.tell() + 512 + len(data) // 2      # header block + half the data
            tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(raw[:keep] if cut_inside else raw)
    return path


def img2dataset_sample(key: str, caption: str | bytes | None, image: bytes | None) -> list[tuple[str, bytes]]:
    """The members img2dataset writes for one sample (``.jpg``, ``.txt``, ``.json``)."""
    members = []
    if image is not None:
        members.append((f"{key}.jpg", image))
    if caption is not None:
        members.append((f"{key}.txt", caption if isinstance(caption, bytes) else caption.encode()))
    meta = {"caption": caption if isinstance(caption, str) else None, "url": f"http://x.invalid/{key}.jpg",
            "key": key, "status": "success", "error_message": None, "width": 16, "height": 16}
    members.append((f"{key}.json", json.dumps(meta, indent=4).encode()))
    return members


def write_plain_pickle(path: str, obj) -> str:
    """A protocol-2 pickle of builtins, like RefCOCO's Python-2 ``refs(unc).p``."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)
    return path


class _RunsCode:
    """Pickles to a call of ``os.system`` — what a malicious data file would contain."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_malicious_pickle(path: str, marker: str) -> str:
    """A refs pickle that would create ``marker`` if loaded with plain ``pickle.load``."""
    return write_plain_pickle(path, [{"ref_id": 1, "payload": _RunsCode(marker)}])

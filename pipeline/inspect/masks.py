"""Mask pictures: the ``[L, L]`` mask of one attention mode, drawn from
:func:`pipeline.model.attention.dense_mask` itself (no second copy of any rule).

One PNG per mode, two panels side by side:

* **mask** — row = query, column = key; a cell is :data:`VISIBLE` where the query may attend the key and
  :data:`HIDDEN` where it may not;
* **difference from causal** — :data:`SAME` where both the mode and ``causal`` see the pair, :data:`ADDED`
  where only the mode does (MMA's unlocked paths), :data:`REMOVED` where only ``causal`` does (``cca``).

Along both axes a strip shows each token's role (:class:`pipeline.inspect.roles.Role`, colours in
:data:`ROLE_COLORS`); black lines mark the boundaries of packed documents. When the images are large
(``collapse_images``), the N slots of each image become one cell, coloured by the share of its pairs that
are visible (for the difference panel: the mix of the four colours in the proportions of its pairs).
Figures are laid out on a fixed grid (no tight bounding box), so :class:`MaskPicture` knows where each
panel's cells lie in the PNG.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from pipeline.inspect.roles import Role
from pipeline.model import attention
from pipeline.tokens import IMAGE

VISIBLE = np.array([0.10, 0.16, 0.42])
HIDDEN = np.array([1.0, 1.0, 1.0])
SAME = np.array([0.75, 0.75, 0.75])
ADDED = np.array([0.86, 0.12, 0.12])
REMOVED = np.array([0.10, 0.45, 0.90])
ROLE_COLORS: dict[Role, np.ndarray] = {
    Role.PAD: np.array([1.0, 1.0, 1.0]),
    Role.SYSTEM: np.array([0.62, 0.62, 0.62]),
    Role.USER: np.array([0.39, 0.71, 0.96]),
    Role.IMAGE: np.array([1.00, 0.60, 0.00]),
    Role.QUESTION: np.array([0.26, 0.63, 0.28]),
    Role.ANSWER: np.array([0.56, 0.14, 0.67]),
}

# Layout in inches: panel side, role strip, gaps, margins.
_PANEL, _STRIP, _GAP, _LEFT, _MID, _RIGHT, _BOTTOM, _TOP = 5.0, 0.14, 0.04, 0.75, 0.95, 1.9, 0.6, 0.8
DPI = 100
MAX_TICKS = 24


@dataclasses.dataclass
class MaskPicture:
    """A written picture: its path, the token indices of each display cell, and where each part lies in
    the PNG as a pixel box ``(left, top, right, bottom)``: ``mask`` and ``difference`` (the panels),
    ``keys`` and ``queries`` (the role strips above and left of the mask panel)."""

    path: str
    mode: str
    cells: list[np.ndarray]
    boxes: dict[str, tuple[float, float, float, float]]


def display_cells(modality_ids: np.ndarray, document_ids: np.ndarray | None, num_visual_tokens: int,
                  collapse_images: bool) -> list[np.ndarray]:
    """Token indices of each display cell, in order: one token per cell, or, with ``collapse_images``, the
    N slots of each image in one cell (consecutive images of a run are cut every N slots)."""
    mods = np.asarray(modality_ids)
    docs = np.ones_like(mods) if document_ids is None else np.asarray(document_ids)
    cells: list[list[int]] = []
    slot = 0
    for t, mod in enumerate(mods.tolist()):
        continues_image = (t > 0 and mod == IMAGE and mods[t - 1] == IMAGE and docs[t] == docs[t - 1]
                           and slot % num_visual_tokens != 0)
        if collapse_images and continues_image:
            cells[-1].append(t)
        else:
            cells.append([t])
        slot = slot + 1 if continues_image else 1
    return [np.array(c) for c in cells]


def cell_means(pairs: torch.Tensor, cells: list[np.ndarray]) -> np.ndarray:
    """Share of True pairs in each (query cell, key cell) block of a bool ``[L, L]`` matrix → ``[C, C]``."""
    average = torch.zeros(len(cells), pairs.shape[0], dtype=torch.float64)
    for c, idx in enumerate(cells):
        average[c, torch.as_tensor(idx)] = 1.0 / len(idx)
    return (average @ pairs.double() @ average.T).numpy()


def mode_masks(modality_ids: np.ndarray, document_ids: np.ndarray | None, mode: str,
               num_visual_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask, causal)``: the bool ``[L, L]`` masks of ``mode`` and of ``causal`` for one row."""
    mods = torch.as_tensor(np.asarray(modality_ids), dtype=torch.long)[None]
    docs = None if document_ids is None else torch.as_tensor(np.asarray(document_ids), dtype=torch.long)[None]
    return (attention.dense_mask(mods, mode, docs, num_visual_tokens)[0],
            attention.dense_mask(mods, "causal", docs, num_visual_tokens)[0])


def _mix(weights: list[np.ndarray], colors: list[np.ndarray]) -> np.ndarray:
    return sum(w[..., None] * c for w, c in zip(weights, colors))


def panel_colors(mask: torch.Tensor, causal: torch.Tensor, cells: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """RGB ``[C, C, 3]`` of the mask panel and of the difference-from-causal panel."""
    visible = cell_means(mask, cells)
    mask_rgb = _mix([1 - visible, visible], [HIDDEN, VISIBLE])
    same, added, removed = (cell_means(m, cells) for m in (mask & causal, mask & ~causal, ~mask & causal))
    diff_rgb = _mix([1 - same - added - removed, same, added, removed], [HIDDEN, SAME, ADDED, REMOVED])
    return mask_rgb, diff_rgb


def _figure_size() -> tuple[float, float]:
    width = _LEFT + 2 * (_STRIP + _GAP + _PANEL) + _MID + _RIGHT
    return width, _BOTTOM + _PANEL + _GAP + _STRIP + _TOP


def _boxes() -> dict[str, tuple[float, float, float, float]]:
    """Rectangles ``(x, y, w, h)`` in inches from the bottom-left corner."""
    boxes = {}
    for k, name in enumerate(("mask", "difference")):
        x = _LEFT + k * (_STRIP + _GAP + _PANEL + _MID) + _STRIP + _GAP
        boxes[name] = (x, _BOTTOM, _PANEL, _PANEL)
        suffix = "" if k == 0 else "_difference"
        boxes["keys" + suffix] = (x, _BOTTOM + _PANEL + _GAP, _PANEL, _STRIP)
        boxes["queries" + suffix] = (x - _GAP - _STRIP, _BOTTOM, _STRIP, _PANEL)
    return boxes


def _ticks(cells: list[np.ndarray], roles: np.ndarray) -> tuple[list[int], list[str]]:
    """Cell positions where a role band starts, labelled with the token index; a start closer than
    1/MAX_TICKS of the axis to the previous tick is left out so the labels stay readable."""
    ticks: list[int] = []
    for c in range(len(cells)):
        band_start = c == 0 or roles[cells[c][0]] != roles[cells[c - 1][0]]
        if band_start and (not ticks or c - ticks[-1] >= len(cells) / MAX_TICKS):
            ticks.append(c)
    return ticks, [str(int(cells[c][0])) for c in ticks]


def draw_mask_picture(path: str, modality_ids: np.ndarray, roles: np.ndarray, mode: str, num_visual_tokens: int,
                      document_ids: np.ndarray | None = None, collapse_images: bool = False,
                      title: str = "") -> MaskPicture:
    """Write the PNG of ``mode``'s mask for one row (see the module docstring) and describe its layout."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    mask, causal = mode_masks(modality_ids, document_ids, mode, num_visual_tokens)
    cells = display_cells(modality_ids, document_ids, num_visual_tokens, collapse_images)
    mask_rgb, diff_rgb = panel_colors(mask, causal, cells)
    cell_roles = np.array([roles[c[0]] for c in cells])
    role_rgb = np.stack([ROLE_COLORS[Role(r)] for r in cell_roles])
    docs = None if document_ids is None else np.asarray(document_ids)
    boundaries = [] if docs is None else [c - 0.5 for c in range(1, len(cells))
                                          if docs[cells[c][0]] != docs[cells[c - 1][0]]]
    width, height = _figure_size()
    fig = plt.figure(figsize=(width, height), dpi=DPI)
    inches = _boxes()
    axes = {name: fig.add_axes([x / width, y / height, w / width, h / height]) for name, (x, y, w, h) in inches.items()}
    interpolation = "nearest" if len(cells) <= _PANEL * DPI else "antialiased"
    ticks, labels = _ticks(cells, roles)
    for name, rgb, heading in (("mask", mask_rgb, f"{mode}: query (row) may attend key (column)"),
                               ("difference", diff_rgb, f"{mode}: difference from causal")):
        suffix = "" if name == "mask" else "_difference"
        panel, keys, queries = axes[name], axes["keys" + suffix], axes["queries" + suffix]
        panel.imshow(rgb, aspect="auto", interpolation=interpolation)
        for b in boundaries:
            panel.axhline(b, color="black", lw=0.8)
            panel.axvline(b, color="black", lw=0.8)
        panel.set_xticks(ticks, labels, fontsize=7, rotation=90)
        panel.set_yticks([])
        panel.set_xlabel("key (token index)")
        keys.imshow(role_rgb[None], aspect="auto", interpolation=interpolation)
        keys.set_title(heading, fontsize=10)
        keys.set_xticks([])
        keys.set_yticks([])
        queries.imshow(role_rgb[:, None], aspect="auto", interpolation=interpolation)
        queries.set_xticks([])
        queries.set_yticks(ticks, labels, fontsize=7)
        queries.set_ylabel("query (token index)")
    fig.suptitle(title or mode, fontsize=11)
    handles = [Patch(color=ROLE_COLORS[r], label=r.name.lower()) for r in Role if r != Role.PAD]
    handles += [Patch(color=VISIBLE, label="visible"), Patch(facecolor=HIDDEN, edgecolor="0.6", label="hidden"),
                Patch(color=SAME, label="visible in both"), Patch(color=ADDED, label="added vs causal"),
                Patch(color=REMOVED, label="removed vs causal")]
    fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    pixel_boxes = {name: (x * DPI, (height - y - h) * DPI, (x + w) * DPI, (height - y) * DPI)
                   for name, (x, y, w, h) in inches.items()}
    return MaskPicture(path, mode, cells, pixel_boxes)


__all__ = ["ADDED", "HIDDEN", "REMOVED", "ROLE_COLORS", "SAME", "VISIBLE", "MaskPicture", "cell_means",
           "display_cells", "draw_mask_picture", "mode_masks", "panel_colors"]

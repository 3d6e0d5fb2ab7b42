"""SFT sources: one parser per dataset, each reading the dataset's original files.

:data:`SFT_SOURCES` is the registry (name → :class:`~data_prep.sft.common.SftSource`); adding a source
is adding a module with a ``SOURCES`` list and importing it here. Names match ``mixture.yaml`` and
the Table 4 ratios in :mod:`data_prep.mixture`.
"""
from __future__ import annotations

from data_prep.sft import choice, grounding, llava, vqa
from data_prep.sft.common import SftOptions, SftSource

SFT_SOURCES: dict[str, SftSource] = {}
for _module in (vqa, choice, grounding, llava):
    for _source in _module.SOURCES:
        if _source.name in SFT_SOURCES:
            raise ValueError(f"SFT source {_source.name!r} is registered twice")
        SFT_SOURCES[_source.name] = _source


def get_sft_source(name: str) -> SftSource:
    """Look up a source by name, with the known names in the error."""
    try:
        return SFT_SOURCES[name]
    except KeyError:
        raise ValueError(f"unknown SFT source {name!r}; known: {', '.join(SFT_SOURCES)}") from None


__all__ = ["SFT_SOURCES", "SftOptions", "SftSource", "get_sft_source"]

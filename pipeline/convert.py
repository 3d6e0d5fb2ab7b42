"""Convert between the released AKI checkpoint layout and this project's export folders.

    python -m pipeline.convert from-official SRC OUT [--vision-encoder-path P] [--lang-model-path P]
    python -m pipeline.convert to-official SRC OUT [--vision-encoder-path P] [--lang-model-path P]

The released layout (reference/OFFICIAL_AKI.md): ``config.json`` with the official ``AKI`` constructor's
keyword arguments, ``model.safetensors`` (or a sharded index, which other tools write) with keys
``vision_encoder.*`` / ``vision_tokenizer.*`` / ``lang_model.*``, and the tokenizer files. Our export:
``aki_config.json``, safetensors and tokenizer (:mod:`pipeline.model.loading`).

The two are the same weights under other names (:data:`KEY_RULES`), so conversion renames tensors and
never changes one: the released model's added ``<image>`` / ``<|endofchunk|>`` rows become our added
rows for ids 32012/32013 and its output bias our output bias (:mod:`pipeline.model.vocab`); SigLIP's
pooling head, unused by AKI, is dropped (and written back from ``--vision-encoder-path`` when that
folder holds it). Tensors stream one at a time; the output is written to a temporary folder beside OUT
and moved into place only when complete, so a failed conversion leaves nothing at OUT.

The SigLIP and Phi-3 configurations are read from ``vision_encoder_path`` / ``lang_model_path`` of the
official config when those are local folders, else taken from the built-in ``aki-4b`` size for the two
known hub ids. The official code builds a 6-layer 8 × 64 resampler; the depth, heads (of 64) and width
are read from the tensors.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import AutoConfig

from pipeline.model.loading import CONFIG_NAME, FORMAT_VERSION, build_from_config, model_config, read_config
from pipeline.model.sizes import MODEL_SIZES, get_model_size
from pipeline.model.tensor_files import TensorSource, write_safetensors
from pipeline.model.tokenizer import added_token_layout, load_tokenizer

OFFICIAL_CONFIG = "config.json"
OFFICIAL_DIM_HEAD = 64          # the official Perceiver Resampler's head width (not stored in config.json)
RELEASED = get_model_size("aki-4b")
KNOWN_VISION = {RELEASED.vision_weights: RELEASED.vision}   # hub id -> built-in SiglipVisionConfig kwargs
KNOWN_LLM = {RELEASED.llm_weights: RELEASED.llm}            # hub id -> built-in Phi3Config kwargs
MAX_SHARD_BYTES = 5 * 1024 ** 3                             # our exports: as save_torch_state_dict

# (official key pattern, our key pattern); ``{i}`` is a layer number, the rest of the key is kept.
# The first rule whose pattern prefixes a key applies (specific rules first).
KEY_RULES: list[tuple[str, str]] = [
    ("vision_encoder.", "vision.vision_model."),
    ("vision_tokenizer.projection.", "projection."),
    ("vision_tokenizer.layers.{i}.0.", "resampler.layers.{i}.attn."),
    ("vision_tokenizer.layers.{i}.1.", "resampler.layers.{i}.ff."),
    ("vision_tokenizer.", "resampler."),
    ("lang_model.model.embed_tokens.additional_embedding.", "added_embedding."),
    ("lang_model.lm_head.additional_fc.", "output.head."),
    ("lang_model.lm_head.bias", "output.base_bias"),
    ("lang_model.", "llm."),
]
DROPPED_OFFICIAL = "vision_encoder.head."   # SigLIP's pooling head: AKI reads last_hidden_state


def _compile(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(re.escape("{i}"), r"(?P<i>\d+)"))


_RULES = [(_compile(official), official, _compile(ours), ours) for official, ours in KEY_RULES]


def _rename(key: str, forward: bool) -> str:
    for off_re, off, our_re, our in _RULES:
        match = (off_re if forward else our_re).match(key)
        if match:
            target = (our if forward else off).replace("{i}", match.groupdict().get("i") or "")
            return target + key[match.end():]
    raise ValueError(f"tensor {key!r} has no place in the {'our' if forward else 'official'} layout")


def our_key(official_key: str) -> str:
    """Our export's name for an official tensor (see :data:`KEY_RULES`)."""
    return _rename(official_key, forward=True)


def official_key(key: str) -> str:
    """The released checkpoint's name for one of our tensors."""
    return _rename(key, forward=False)


class ConvertError(ValueError):
    """The input is not what the conversion needs; the message names the input and the fix."""


# ---- configurations -------------------------------------------------------------------------------------

def _part_config(path: str | None, known: dict[str, dict], attr: str, what: str, option: str) -> dict[str, Any]:
    """kwargs of a part's config: from a local folder's config.json, else the built-in one of a known id."""
    if path and os.path.isdir(path):
        config = AutoConfig.from_pretrained(path)
        config = getattr(config, attr, None) or config      # a full SigLIP config holds a vision_config
        return config.to_diff_dict()
    if path in known:
        return dict(known[path])
    raise ConvertError(f"{what} path {path!r} is neither a local folder nor a known id ({', '.join(known)}); "
                       f"pass {option} FOLDER with its config.json")


def _resampler_config(source: TensorSource) -> dict[str, int]:
    keys = source.keys()
    depth = len({k.split(".")[2] for k in keys if k.startswith("vision_tokenizer.layers.")})
    num_latents, dim = source.spec("vision_tokenizer.latents")[1]
    inner = source.spec("vision_tokenizer.layers.0.0.to_q.weight")[1][0]
    hidden = source.spec("vision_tokenizer.layers.0.1.1.weight")[1][0]
    if inner % OFFICIAL_DIM_HEAD or hidden % dim:
        raise ConvertError(f"resampler query width {inner} is not a multiple of the official head width "
                           f"{OFFICIAL_DIM_HEAD} (or its MLP {hidden} of its width {dim}): not an AKI checkpoint")
    return dict(dim=dim, depth=depth, heads=inner // OFFICIAL_DIM_HEAD, dim_head=OFFICIAL_DIM_HEAD,
                ff_mult=hidden // dim, num_latents=num_latents)


def _size_name(vision: dict, resampler: dict, llm: dict) -> str:
    """The registered size with these dimensions (``aki-4b`` for the release), else ``custom``. The
    embedding table's rows are not compared: a size's table grows with its tokenizer."""
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size",
            "patch_size")
    for name, size in MODEL_SIZES.items():
        if size.resampler == resampler and all(size.vision.get(k) == vision.get(k) for k in keys) \
                and all(size.llm.get(k) == llm.get(k) for k in keys[:4]):
            return name
    return "custom"


# ---- writing --------------------------------------------------------------------------------------------

def _write_atomically(out: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` on a temporary folder beside ``out``; move it to ``out`` only on success."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConvertError(f"output {out} already exists and is not empty; choose a new folder or delete it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        write(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _check_shapes(expected: dict[str, torch.Size], found: dict[str, tuple[int, ...]], what: str) -> None:
    missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    if missing or unexpected:
        raise ConvertError(f"{what}: missing tensors {missing[:5]} ({len(missing)}), unexpected {unexpected[:5]} "
                           f"({len(unexpected)}); is it an AKI checkpoint of this architecture?")
    for key, shape in expected.items():
        if tuple(shape) != tuple(found[key]):
            raise ConvertError(f"{what}: tensor {key!r} has shape {tuple(found[key])} but its config says "
                               f"{tuple(shape)}; the weights do not belong to this config")


def from_official(src: str | os.PathLike, out: str | os.PathLike, vision_encoder_path: str | None = None,
                  lang_model_path: str | None = None) -> Path:
    """Convert a released-layout checkpoint folder ``src`` into our export folder ``out``."""
    src = Path(src)
    config_path = src / OFFICIAL_CONFIG
    if not config_path.is_file():
        raise ConvertError(f"{src} is not a released AKI checkpoint: {OFFICIAL_CONFIG} is missing")
    official = json.loads(config_path.read_text())
    needed = ("vision_encoder_path", "lang_model_path", "initial_tokenizer_len", "num_vision_tokens")
    if not isinstance(official, dict) or any(k not in official for k in needed):
        raise ConvertError(f"{config_path} lacks the official AKI keys {needed}: not a released AKI checkpoint")
    if not (src / "tokenizer_config.json").is_file():
        raise ConvertError(f"{src} holds no tokenizer (tokenizer_config.json); the released checkpoint ships its "
                           "tokenizer beside the weights")
    vision = _part_config(vision_encoder_path or official["vision_encoder_path"], KNOWN_VISION, "vision_config",
                          "vision encoder", "--vision-encoder-path")
    llm = _part_config(lang_model_path or official["lang_model_path"], KNOWN_LLM, "text_config", "language model",
                       "--lang-model-path")
    tokenizer = load_tokenizer(src)
    num_base_ids = added_token_layout(tokenizer)
    if num_base_ids != official["initial_tokenizer_len"]:
        raise ConvertError(f"{config_path} says initial_tokenizer_len={official['initial_tokenizer_len']} but the "
                           f"tokenizer in {src} puts <image> at id {num_base_ids}; use the checkpoint's own tokenizer")
    with TensorSource(src) as source:
        for key in ("vision_tokenizer.latents", "vision_tokenizer.layers.0.0.to_q.weight",
                    "lang_model.model.embed_tokens.weight"):
            if key not in source.keys():
                raise ConvertError(f"{src}: tensor {key!r} is missing: not a released AKI checkpoint")
        resampler = _resampler_config(source)
        llm = {**llm, "vocab_size": source.spec("lang_model.model.embed_tokens.weight")[1][0]}
        config = {"format_version": FORMAT_VERSION, "size": _size_name(vision, resampler, llm), "attention_mode": "mma",
                  "attn_implementation": "sdpa", "num_visual_tokens": resampler["num_latents"],
                  "image_size": vision["image_size"], "num_base_ids": num_base_ids, "text_layout": "released",
                  "vision": vision, "resampler": resampler, "llm": llm}
        if official["num_vision_tokens"] != resampler["num_latents"]:
            raise ConvertError(f"{config_path} says num_vision_tokens={official['num_vision_tokens']} but the "
                               f"resampler has {resampler['num_latents']} latents")
        with torch.device("meta"):
            skeleton = build_from_config(config)
        names = {our_key(k): k for k in source.keys() if not k.startswith(DROPPED_OFFICIAL)}
        _check_shapes({k: v.shape for k, v in skeleton.state_dict().items()},
                      {ours: source.spec(off)[1] for ours, off in names.items()}, f"checkpoint {src}")
        config = {**model_config(skeleton), "size": config["size"]}

        def write(tmp: Path) -> None:
            write_safetensors(tmp, {ours: source.spec(off) for ours, off in names.items()},
                              lambda ours: source.get(names[ours]), MAX_SHARD_BYTES)
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            tokenizer.save_pretrained(str(tmp))

        return _write_atomically(out, write)


def _vision_head(folder: str | None) -> tuple[TensorSource | None, dict[str, str]]:
    """SigLIP pooling-head tensors of a local SigLIP folder: official key -> key in that folder."""
    if not folder or not os.path.isdir(folder):
        return None, {}
    source = TensorSource(folder)
    head = {}
    for key in source.keys():
        match = re.match(r"^(?:.*\.)?vision_model\.head\.(.+)$", key)
        if match:
            head[DROPPED_OFFICIAL + match.group(1)] = key
    return source, head


def to_official(src: str | os.PathLike, out: str | os.PathLike, vision_encoder_path: str | None = None,
                lang_model_path: str | None = None) -> Path:
    """Write our export folder ``src`` in the released layout at ``out`` (one ``model.safetensors``)."""
    config = read_config(src)
    vision_path = vision_encoder_path or (RELEASED.vision_weights if config["size"] == RELEASED.name else None)
    llm_path = lang_model_path or (RELEASED.llm_weights if config["size"] == RELEASED.name else None)
    if vision_path is None or llm_path is None:
        raise ConvertError(f"{src} holds a {config['size']!r} model, not aki-4b: pass --vision-encoder-path and "
                           "--lang-model-path (the folders the official code builds the two parts from)")
    if not (Path(src) / "tokenizer_config.json").is_file():
        raise ConvertError(f"{src} holds no tokenizer; the released layout ships one (export with a tokenizer)")
    tokenizer = load_tokenizer(src)
    with torch.device("meta"):
        skeleton = build_from_config(config)
    r = config["resampler"]
    if (r["depth"], r["heads"], r["dim_head"]) != (6, 8, OFFICIAL_DIM_HEAD):
        print(f"note: the official code builds a 6-layer 8 x {OFFICIAL_DIM_HEAD} resampler; this one is "
              f"{r['depth']} x {r['heads']} x {r['dim_head']} and loads only where the code is built for it",
              file=sys.stderr)
    with TensorSource(src) as source:
        _check_shapes({k: v.shape for k, v in skeleton.state_dict().items()},
                      {k: source.spec(k)[1] for k in source.keys()}, f"export {src}")
        names = {official_key(k): k for k in source.keys()}
        head_source, head = _vision_head(vision_encoder_path)
        if not head:
            print(f"note: no SigLIP pooling head found in {vision_encoder_path!r}; the official loader keeps the "
                  "one it builds from vision_encoder_path (AKI does not use it)", file=sys.stderr)
        specs = {**{off: source.spec(ours) for off, ours in names.items()},
                 **{off: head_source.spec(key) for off, key in head.items()}}
        official = {"vision_encoder_path": vision_path, "lang_model_path": llm_path,
                    "pad_token_id": tokenizer.pad_token_id, "initial_tokenizer_len": config["num_base_ids"],
                    "num_vision_tokens": config["num_visual_tokens"], "decoder_layers_attr_name": "model.layers",
                    "base_img_size": config["image_size"], "gradient_checkpointing": False, "tokenizer": None}

        def load(key: str) -> torch.Tensor:
            return source.get(names[key]) if key in names else head_source.get(head[key])

        def write(tmp: Path) -> None:
            write_safetensors(tmp, specs, load, max_shard_bytes=None)   # the official loader reads one file
            (tmp / OFFICIAL_CONFIG).write_text(json.dumps(official, indent=2) + "\n")
            tokenizer.save_pretrained(str(tmp))

        with head_source or contextlib.nullcontext():
            return _write_atomically(out, write)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="direction", required=True)
    for name, help_text in (("from-official", "released AKI folder -> our export folder"),
                            ("to-official", "our export folder -> released AKI layout")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("src")
        p.add_argument("out")
        p.add_argument("--vision-encoder-path", help="SigLIP folder (or hub id) the official config names")
        p.add_argument("--lang-model-path", help="Phi-3.5 folder (or hub id) the official config names")
    args = parser.parse_args(argv)
    convert = from_official if args.direction == "from-official" else to_official
    try:
        out = convert(args.src, args.out, args.vision_encoder_path, args.lang_model_path)
    except (ConvertError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({'official' if args.direction == 'to-official' else 'export'} layout)")
    return 0


if __name__ == "__main__":
    from pipeline.process import run_command

    run_command(main)

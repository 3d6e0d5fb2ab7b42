"""Command line of :mod:`pipeline.inspect`: ``python -m pipeline.inspect {masks,attention} ...``.

    python -m pipeline.inspect masks --data data/sft/aokvqa --index 0 --tokenizer TOKENIZER --out masks/
    python -m pipeline.inspect masks --question "How many cats?" --image cat.jpg --tokenizer TOKENIZER \\
        --model-size aki-4b --out masks/
    python -m pipeline.inspect attention --model runs/sft_mma/export --model runs/sft_causal/export \\
        --data data/sft/aokvqa --index 0 1 2 3 --out attention/
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

import numpy as np
import torch

from pipeline.chat import DEFAULT_LAYOUT, LAYOUTS
from pipeline.inspect import MASKS_INDEX, SHARE_JSON, SHARE_PLOT
from pipeline.model.attention import MODES, position_ids
from pipeline.tokens import IMAGE


def _add_sample_args(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="MDS dataset folder written by data_prep/ (with its manifest.json)")
    source.add_argument("--question", help="a question, laid out through the chat template")
    p.add_argument("--index", type=int, nargs="+", default=None,
                   help="sample indices in --data (default: 0)")
    p.add_argument("--image", action="append", default=[],
                   help="image file of --question (repeat for several images)")
    p.add_argument("--answer", default=None,
                   help="answer of --question (default: none; the prompt ends where the answer starts, "
                        "as in generation)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline.inspect", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    masks = commands.add_parser("masks", help="a PNG of the attention mask per mode",
                                description="Draw the [L, L] mask of each mode for one sample (several --index "
                                            "values are packed into one row), with a difference-from-causal panel.")
    _add_sample_args(masks)
    masks.add_argument("--tokenizer", required=True,
                       help="tokenizer folder (or an export folder) the data was encoded with")
    masks.add_argument("--model-size", default="aki-4b",
                       help="size whose N visual tokens lay out --question (default: aki-4b); "
                            "--data uses its manifest's N")
    masks.add_argument("--text-layout", choices=sorted(LAYOUTS), default=DEFAULT_LAYOUT,
                       help=f"layout of --question (default: {DEFAULT_LAYOUT}); --data uses its manifest's layout")
    masks.add_argument("--modes", nargs="+", choices=list(MODES), default=None,
                       help="modes to draw (default: every mode the layout allows)")
    masks.add_argument("--collapse-above", type=int, default=16,
                       help="draw each image as one cell when N is larger than this (default: 16)")
    masks.add_argument("--out", required=True, help="output folder for mask_<mode>.png and masks.json")
    attention = commands.add_parser("attention", help="image → question attention share per layer",
                                    description="Per LLM layer, the share of each image token's attention mass "
                                                "that goes to the question tokens (0 under causal).")
    _add_sample_args(attention)
    attention.add_argument("--model", action="append", required=True,
                           help="export folder (AKIModel.save_pretrained); repeat to compare models")
    attention.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda when available)")
    attention.add_argument("--out", required=True, help=f"output folder for {SHARE_PLOT} and {SHARE_JSON}")
    return parser


def _samples(args: argparse.Namespace, tokenizer, num_visual_tokens: int | None, text_layout: str | None):
    """The samples of ``--data`` (checked against the model's N and layout when given), or of ``--question``
    laid out in ``text_layout``."""
    from pipeline.inspect.samples import dataset_samples, question_sample

    if args.data is not None:
        if args.image or args.answer is not None:
            raise ValueError("--image and --answer go with --question, not with --data")
        return dataset_samples(args.data, args.index or [0], tokenizer, num_visual_tokens, text_layout)
    if args.index is not None:
        raise ValueError("--index picks samples of --data; with --question, leave it out")
    return [question_sample(tokenizer, args.question, args.image, num_visual_tokens, text_layout, args.answer)]


def run_masks(args: argparse.Namespace) -> int:
    from pipeline.inspect.masks import draw_mask_picture
    from pipeline.inspect.roles import token_roles
    from pipeline.inspect.samples import packed_row
    from pipeline.model.sizes import get_model_size
    from pipeline.model.tokenizer import load_tokenizer, role_tag_ids

    tokenizer = load_tokenizer(args.tokenizer)
    from_data = args.data is not None
    samples = _samples(args, tokenizer, None if from_data else get_model_size(args.model_size).num_visual_tokens,
                       None if from_data else args.text_layout)
    n = samples[0].num_visual_tokens
    input_ids, modality_ids, document_ids = packed_row(samples)
    roles = token_roles(input_ids, modality_ids, role_tag_ids(tokenizer), document_ids)
    images = int((modality_ids == IMAGE).sum()) // n
    title = (f"{' + '.join(s.name for s in samples)}: {len(input_ids)} tokens, {len(samples)} document(s), "
             f"{images} image(s) of N={n} slots" + (" (one cell each)" if n > args.collapse_above else ""))
    os.makedirs(args.out, exist_ok=True)
    pictures, skipped = {}, {}
    for mode in args.modes or MODES:
        try:    # the mode's positions: a layout the mode cannot take (cca on a non-square N) raises here
            position_ids(torch.as_tensor(modality_ids)[None], mode,
                         None if document_ids is None else torch.as_tensor(document_ids)[None], n)
        except ValueError as err:
            if args.modes:
                raise
            skipped[mode] = str(err)
            print(f"skipped {mode}: {err}", file=sys.stderr)
            continue
        path = os.path.join(args.out, f"mask_{mode}.png")
        draw_mask_picture(path, modality_ids, roles, mode, n, document_ids, n > args.collapse_above, title)
        pictures[mode] = os.path.basename(path)
        print(f"wrote {path}")
    index = {"samples": [s.name for s in samples], "tokens": len(input_ids), "documents": len(samples),
             "images": images, "num_visual_tokens": n, "pictures": pictures, "skipped": skipped}
    with open(os.path.join(args.out, MASKS_INDEX), "w") as f:
        json.dump(index, f, indent=2)
    return 0


def _label(model, folder: str, taken: Sequence[str]) -> str:
    return model.attention_mode if model.attention_mode not in taken else f"{model.attention_mode} ({folder})"


def run_attention(args: argparse.Namespace) -> int:
    from pipeline.eval.runner import load_model
    from pipeline.inspect.share import measure, plot_shares, write_shares

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    results = {}
    for folder in args.model:
        model, tokenizer = load_model(folder, device, attn_implementation="eager")
        result = measure(model, _samples(args, tokenizer, model.num_visual_tokens, model.text_layout))
        results[_label(model, folder, list(results))] = {"export": os.path.abspath(folder), **result}
        print(f"{folder}: image → question share per layer "
              f"{np.round(result['per_layer'], 4).tolist()} (mean {result['mean']:.4f}, {result['samples']} "
              f"samples, skipped {result['skipped'] or 'none'})")
    os.makedirs(args.out, exist_ok=True)
    plot_shares(results, os.path.join(args.out, SHARE_PLOT))
    write_shares(results, os.path.join(args.out, SHARE_JSON))
    print(f"wrote {os.path.join(args.out, SHARE_PLOT)} and {SHARE_JSON}")
    return 0


COMMANDS = {"masks": run_masks, "attention": run_attention}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError) as err:
        print(f"python -m pipeline.inspect {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    from pipeline.process import run_command

    run_command(main)

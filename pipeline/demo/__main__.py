"""Command line of the demo page: ``python -m pipeline.demo --model EXPORT [--model EXPORT2 ...]``.

Safe by default: the server binds 127.0.0.1 (this machine only), makes a public share link only with
``--share``, sends no usage statistics, and caps each question (``--max-images``, ``--max-image-mb``,
``--max-image-pixels``, ``--max-question-chars``) and the queue (``--max-queue``).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Sequence

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")   # before gradio is imported

import torch  # noqa: E402

from pipeline.demo.inputs import Limits, Sampling  # noqa: E402

if TYPE_CHECKING:
    import gradio

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def build_parser() -> argparse.ArgumentParser:
    limits, sampling = Limits(), Sampling()
    parser = argparse.ArgumentParser(prog="python -m pipeline.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", required=True,
                        help="export folder (AKIModel.save_pretrained); repeat to put models side by side")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default: 127.0.0.1, this machine only; 0.0.0.0 opens the page to "
                             "the network)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true",
                        help="also make a public gradio.live link (off by default: anyone with it can use the page)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-new-tokens", type=int, default=sampling.max_new_tokens,
                        help=f"default answer length (default: {sampling.max_new_tokens})")
    parser.add_argument("--max-images", type=int, default=limits.max_images)
    parser.add_argument("--max-image-mb", type=float, default=limits.max_image_mb)
    parser.add_argument("--max-image-pixels", type=int, default=limits.max_image_pixels)
    parser.add_argument("--max-question-chars", type=int, default=limits.max_question_chars)
    parser.add_argument("--max-queue", type=int, default=16, help="requests the queue holds (default: 16)")
    return parser


def serve(args: argparse.Namespace) -> gradio.Blocks:
    """Load the models of parsed ``args`` and start the page's server (in the background); returns the page."""
    from pipeline.demo.models import load_demo_model
    from pipeline.demo.page import build_page

    limits = Limits(args.max_images, args.max_image_mb, args.max_image_pixels, args.max_question_chars,
                    max(Limits.max_new_tokens, args.max_new_tokens))
    models = [load_demo_model(folder, args.device) for folder in args.model]
    for dm in models:
        print(f"loaded {dm.folder}: {dm.describe()}", flush=True)
    if args.host not in LOOPBACK:
        print(f"warning: binding {args.host}: the page is reachable from other machines", file=sys.stderr)
    page = build_page(models, limits, Sampling(max_new_tokens=args.max_new_tokens), args.max_queue)
    page.launch(server_name=args.host, server_port=args.port, share=args.share, prevent_thread_lock=True,
                ssr_mode=False, mcp_server=False, max_file_size=int(args.max_image_mb * 2**20), theme=_theme(),
                footer_links=["settings"])
    return page


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if min(args.max_images, args.max_image_mb, args.max_image_pixels, args.max_question_chars,
           args.max_new_tokens, args.max_queue) <= 0:
        parser.error("the limits (--max-*) must be positive")
    try:
        page = serve(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"python -m pipeline.demo: error: {err}", file=sys.stderr)
        return 2
    page.block_thread()   # until Ctrl-C
    return 0


def _theme():
    """Gradio's default look with system fonts: the page loads nothing from outside this machine."""
    import gradio as gr

    system = [gr.themes.Font("system-ui"), gr.themes.Font("sans-serif")]
    mono = [gr.themes.Font("ui-monospace"), gr.themes.Font("monospace")]
    return gr.themes.Default(font=system, font_mono=mono)


if __name__ == "__main__":
    sys.exit(main())

"""Batched generation with a KV cache, and a command line that answers a question about an image.

The prompts (built by ``pipeline.chat`` in the model's text layout: TEXT_INPUT + IMAGE, and in the
``released`` layout the answer's leading ``\n`` as a TEXT_TARGET token, as the released model was trained)
are left-padded to one length and prefilled with the model's attention mode: its mask (PAD keys hidden)
and its position ids (0 at each row's first real token; concentric for ``cca``). Each generated token is
TEXT_TARGET: it attends causally to the whole prompt and to the tokens generated before it, at the
position after its row's previous token. Decoding stops at the tokenizer's stop tokens (EOS, which ends
answers in the ``released`` layout; ``<|end|>`` in ``phi3_chat``; ``<|endofchunk|>``) or after
``max_new_tokens``.
This equals a single teacher-forced forward of prompt + answer with the answer marked TEXT_TARGET.

    python -m pipeline.generate --checkpoint EXPORT_DIR --image IMG.jpg --question "What is shown?"
"""
from __future__ import annotations

import argparse
from typing import Sequence

import numpy as np
import torch
from transformers import DynamicCache, PreTrainedTokenizerBase
from transformers.generation.streamers import BaseStreamer

from pipeline.chat import SYSTEM_MESSAGE, Chat, Segment, encode, get_layout
from pipeline.compat import CACHE_KWARG
from pipeline.model import attention
from pipeline.model.aki import AKIModel
from pipeline.model.images import ImageLike
from pipeline.model.tokenizer import stop_token_ids as tokenizer_stop_ids
from pipeline.tokens import IMAGE, PAD


def _check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 (0 = greedy) and 0 < top_p <= 1, got temperature="
                         f"{temperature}, top_p={top_p}")


def left_pad(prompts: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``(input_ids, modality_ids)`` prompts into ``[B, L]`` tensors, padded on the left with PAD."""
    if not prompts:
        raise ValueError("generate needs at least one prompt")
    length = max(len(ids) for ids, _ in prompts)
    input_ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    modality_ids = torch.full((len(prompts), length), PAD, dtype=torch.long)
    for row, (ids, mods) in enumerate(prompts):
        if len(ids) != len(mods) or len(ids) == 0:
            raise ValueError(f"prompt {row}: {len(ids)} input_ids and {len(mods)} modality_ids; "
                             "need the same non-zero length")
        input_ids[row, length - len(ids):] = torch.as_tensor(np.asarray(ids, dtype=np.int64))
        modality_ids[row, length - len(ids):] = torch.as_tensor(np.asarray(mods, dtype=np.int64))
    if (modality_ids[:, -1] == PAD).any() or ((modality_ids == PAD).long().diff(dim=1) > 0).any():
        raise ValueError("prompts must not contain PAD tokens (modality 0)")
    return input_ids, modality_ids


def _next_token(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """Greedy (temperature 0) or nucleus sampling over the last-position logits ``[B, vocab]``."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p   # always keeps the top token
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate_ids(model: AKIModel, prompts: Sequence[tuple[Sequence[int], Sequence[int]]],
                 pixel_values: torch.Tensor | None = None, *, max_new_tokens: int = 128,
                 temperature: float = 0.0, top_p: float = 1.0, stop_token_ids: Sequence[int] | None = None,
                 generator: torch.Generator | None = None, streamer: BaseStreamer | None = None,
                 synced: bool = False) -> list[list[int]]:
    """Generate an answer for each ``(input_ids, modality_ids)`` prompt (e.g. an ``Encoded``'s arrays).

    ``pixel_values`` holds the prompts' images in order. ``stop_token_ids`` defaults to the model
    tokenizer's stop tokens. Returns the generated ids per prompt, without the stop token.
    ``streamer`` (transformers' ``TextIteratorStreamer`` for one prompt) receives each step's tokens ``[B]`` as
    they are chosen, up to the step where every prompt has stopped (that step is not sent), then ``end()``.
    ``synced``: decode until the prompts of *every* rank have stopped (one all-reduce per token), so that all
    ranks run the same number of forwards — a ZeRO-3 model gathers its parameters collectively.
    """
    _check_sampling(max_new_tokens, temperature, top_p)
    if stop_token_ids is None:
        stop_token_ids = tokenizer_stop_ids(model.tokenizer) if model.tokenizer is not None else []
    pad_id = model.llm.config.pad_token_id or 0
    input_ids, modality_ids = left_pad(prompts, pad_id)
    device = next(model.llm.parameters()).device
    input_ids, modality_ids = input_ids.to(device), modality_ids.to(device)
    if pixel_values is not None:
        pixel_values = pixel_values.to(device)
    mode, n = model.attention_mode, model.num_visual_tokens

    cache = DynamicCache(config=model.llm.config)
    hidden = model.llm.model(
        inputs_embeds=model.embed(input_ids, modality_ids, pixel_values),
        attention_mask=model.backend.layout_mask(modality_ids, mode, None, n),
        position_ids=attention.position_ids(modality_ids, mode, None, n),
        use_cache=True, **{CACHE_KWARG: cache},
    ).last_hidden_state
    logits = model.logits(hidden[:, -1])
    # Decode steps: the new token sees every real prompt token and every generated token.
    visible = modality_ids != PAD
    position = attention.position_ids(modality_ids, mode, None, n)[:, -1] + 1
    stops = torch.tensor(list(stop_token_ids), dtype=torch.long, device=device)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    generated = []
    for step in range(max_new_tokens):
        token = _next_token(logits, temperature, top_p, generator)
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        generated.append(token)
        finished |= torch.isin(token, stops)
        if streamer is not None and not finished.all():
            streamer.put(token.cpu())
        if _all_finished(finished, synced) or step == max_new_tokens - 1:
            break
        visible = torch.cat([visible, torch.ones_like(visible[:, :1])], dim=1)
        hidden = model.llm.model(
            inputs_embeds=model.embed_tokens(token[:, None]),
            attention_mask=model.backend.from_dense(visible[:, None, None, :]),
            position_ids=position[:, None] + step,
            use_cache=True, **{CACHE_KWARG: cache},
        ).last_hidden_state
        logits = model.logits(hidden[:, -1])
    if streamer is not None:
        streamer.end()
    return [_until_stop(row, set(stop_token_ids)) for row in torch.stack(generated, dim=1).tolist()]


def _all_finished(finished: torch.Tensor, synced: bool) -> bool:
    """Whether every prompt has stopped: this rank's, or (``synced``) every rank's."""
    if not synced:
        return bool(finished.all())
    import torch.distributed as dist

    running = (~finished).sum().reshape(1)
    if dist.is_initialized():
        dist.all_reduce(running)
    return int(running.item()) == 0


def _until_stop(tokens: list[int], stops: set[int]) -> list[int]:
    for i, tok in enumerate(tokens):
        if tok in stops:
            return tokens[:i]
    return tokens


def generate(model: AKIModel, tokenizer: PreTrainedTokenizerBase | None,
             prompts: Sequence[Chat | Sequence[Segment]], images: Sequence[Sequence[ImageLike]], *,
             max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
             generator: torch.Generator | None = None, streamer: BaseStreamer | None = None,
             synced: bool = False) -> list[str]:
    """Answer each prompt about its images (JPEG bytes, files or PIL images; one per image slot).

    A prompt is a ``Chat`` whose last answer is None (laid out in the model's text layout with its
    images) or ready segments (``chat.chat_segments`` with answer None).

    ``tokenizer`` None uses the model's own; ``streamer`` and ``synced`` as :func:`generate_ids`. Returns the decoded
    answers, special tokens removed.
    """
    tokenizer = tokenizer if tokenizer is not None else model.tokenizer
    if tokenizer is None:
        raise ValueError("no tokenizer: pass one, or load the model from an export folder (it holds one)")
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists; give one list per prompt")
    layout = get_layout(model.text_layout)
    encoded_prompts = []
    for i, (prompt, imgs) in enumerate(zip(prompts, images)):
        segs = layout.segments(prompt, len(imgs)) if isinstance(prompt, Chat) else prompt
        slots = sum(seg.modality == IMAGE for seg in segs)    # adjacent images form one IMAGE run
        if slots != len(imgs):
            raise ValueError(f"prompt {i} has {slots} image slots but {len(imgs)} images")
        encoded = encode(tokenizer, segs, model.num_visual_tokens)
        encoded_prompts.append((encoded.input_ids, encoded.modality_ids))
    flat = [img for imgs in images for img in imgs]
    pixel_values = model.image_processor(flat) if flat else None
    outputs = generate_ids(model, encoded_prompts, pixel_values, max_new_tokens=max_new_tokens,
                           temperature=temperature, top_p=top_p, stop_token_ids=tokenizer_stop_ids(tokenizer),
                           generator=generator, streamer=streamer, synced=synced)
    return [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in outputs]


def answer(model: AKIModel, question: str, images: Sequence[ImageLike] = (), system: str = SYSTEM_MESSAGE,
           **kwargs) -> str:
    """Answer one question about ``images`` in the model's text layout (kwargs as :func:`generate`)."""
    return generate(model, None, [Chat(((question, None),), system)], [list(images)], **kwargs)[0]


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: answer a question about one or more images with an exported model."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.generate",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="export folder (AKIModel.save_pretrained)")
    parser.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    parser.add_argument("--question", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--attn-implementation", default="sdpa",
                        help="attention backend for inference (the attention mode comes from the folder)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else None
    model = AKIModel.from_pretrained(args.checkpoint, attn_implementation=args.attn_implementation,
                                     dtype=dtype).to(args.device)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    print(answer(model, args.question, args.image, max_new_tokens=args.max_new_tokens,
                 temperature=args.temperature, top_p=args.top_p, generator=generator))


if __name__ == "__main__":
    from pipeline.process import run_command

    run_command(main)

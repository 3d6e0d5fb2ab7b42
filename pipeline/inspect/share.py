"""How much an image token reads the question: the attention share, per layer, of a trained model.

For every image token (query) of a sample, the share of its attention mass that goes to the sample's
``question`` tokens (:mod:`pipeline.inspect.roles`: the prompt text after the image, which ``mma``
unlocks), averaged over the heads; per layer, the mean over every image token of every sample.
Under ``causal`` it is 0 by construction (the question comes after the image); under ``mma`` it says how
much of its attention the model spends on the unlocked paths.

The probabilities are the model's own: the model runs its ordinary forward with the ``eager`` backend
(:mod:`pipeline.model.backends`), whose attention layers compute the softmax explicitly and return it,
and a forward hook on each layer's attention module reads them (reduced at once, so no ``[L, L]`` map per
layer is kept). The eager forward gives the same logits as ``sdpa`` and ``flex_attention``.
"""
from __future__ import annotations

import contextlib
import json
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from pipeline.inspect.roles import Role, token_roles
from pipeline.inspect.samples import Sample
from pipeline.model.aki import AKIModel
from pipeline.model.tokenizer import role_tag_ids

DEFINITION = ("share of each image token's attention mass (mean over heads) that goes to question tokens "
              "(the prompt text after the image), averaged over image tokens and samples, per LLM layer")


@contextlib.contextmanager
def recorded_attention(model: AKIModel, reduce: Callable[[torch.Tensor], torch.Tensor]
                       ) -> Iterator[list[torch.Tensor]]:
    """Within the block, every LLM layer's attention probabilities ``[B, heads, Q, K]`` of each forward
    are passed to ``reduce`` and its results appended, in layer order, to the list yielded."""
    if model.attn_implementation != "eager":
        raise ValueError(f"attention probabilities need the eager backend, but the model runs "
                         f"{model.attn_implementation!r}; load it with AKIModel.from_pretrained(folder, "
                         "attn_implementation='eager')")
    results: list[torch.Tensor] = []

    def hook(module: torch.nn.Module, args: tuple, output: tuple) -> None:
        results.append(reduce(output[1].detach()))

    handles = [layer.self_attn.register_forward_hook(hook) for layer in model.llm.model.layers]
    try:
        yield results
    finally:
        for handle in handles:
            handle.remove()


def image_question_share(model: AKIModel, sample: Sample, roles: np.ndarray) -> torch.Tensor:
    """``[layers, image tokens]``: each image token's attention share on question tokens (mean over heads)."""
    device = model.llm.lm_head.weight.device
    queries = torch.as_tensor(roles == Role.IMAGE, device=device)
    keys = torch.as_tensor(roles == Role.QUESTION, device=device, dtype=torch.float32)

    def reduce(probs: torch.Tensor) -> torch.Tensor:
        return (probs[0][:, queries].float() @ keys).mean(dim=0).cpu()

    pixel_values = model.image_processor(sample.images).to(device) if sample.images else None
    with torch.no_grad(), recorded_attention(model, reduce) as per_layer:
        model(torch.as_tensor(sample.input_ids, device=device)[None],
              torch.as_tensor(sample.modality_ids, device=device)[None], pixel_values, return_logits=False)
    return torch.stack(per_layer)


def measure(model: AKIModel, samples: Sequence[Sample]) -> dict:
    """The attention share of ``model`` on ``samples``; samples without an image or without a question are
    skipped and counted by reason. Returns the JSON-ready summary."""
    tags = role_tag_ids(model.tokenizer)
    shares, per_sample, skipped = [], {}, {}
    for sample in samples:
        roles = token_roles(sample.input_ids, sample.modality_ids, tags)
        reason = ("no_image" if not (roles == Role.IMAGE).any() else
                  "no_question" if not (roles == Role.QUESTION).any() else None)
        if reason:
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        share = image_question_share(model, sample, roles)
        shares.append(share)
        per_sample[sample.name] = share.mean(dim=1).tolist()
    if not shares:
        raise ValueError(f"none of the {len(samples)} samples has both an image and a question after it "
                         f"(skipped: {skipped}); inspect SFT samples, or give --question with --image")
    all_tokens = torch.cat(shares, dim=1)
    return {"attention_mode": model.attention_mode, "per_layer": all_tokens.mean(dim=1).tolist(),
            "mean": float(all_tokens.mean()), "samples": len(shares), "image_tokens": all_tokens.shape[1],
            "skipped": skipped, "per_sample": per_sample}


def plot_shares(results: Mapping[str, Mapping], path: str) -> str:
    """Line plot: attention share on the question against the layer, one line per model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for label, result in results.items():
        layers = range(1, len(result["per_layer"]) + 1)
        ax.plot(layers, result["per_layer"], marker="o", label=f"{label} (mean {result['mean']:.3f})")
    ax.set_xlabel("LLM layer")
    ax.set_ylabel("image → question attention share")
    ax.set_title("How much image tokens read the question")
    ax.set_ylim(bottom=0)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_shares(results: Mapping[str, Mapping], path: str) -> str:
    """The numbers as JSON: the definition and each model's result."""
    with open(path, "w") as f:
        json.dump({"definition": DEFINITION, "models": results}, f, indent=2)
    return path


__all__ = ["DEFINITION", "image_question_share", "measure", "plot_shares", "recorded_attention", "write_shares"]

"""The released AKI's vocabulary around the LLM's own tables: two added token rows and an output bias.

The LLM keeps its pretrained embedding table and output layer untouched (Phi-3.5: 32064 rows, of which
ids 0..32011 are used). AKI adds two tokens, ``<image>`` = B and ``<|endofchunk|>`` = B + 1 (B = 32012
for Phi-3.5, see :func:`pipeline.model.tokenizer.added_token_layout`), with rows of their own, and gives
the output layer a bias:

* :class:`AddedEmbedding` — ids below B read the LLM's table, ids B and B + 1 read ``weight`` rows 0/1;
* :class:`AddedOutput` — logits ``[..., B + 2]``: the LLM's output rows 0..B-1 plus ``bias``, then the
  two added rows (``weight``/``bias`` of the added head). Table rows at and past B are never read, so
  they can neither win an argmax nor carry probability.

Both take the LLM module they extend as a call argument (not a submodule, so no weight is held twice)
and run through ``__call__``, so ZeRO-3 gathers their parameters as for any module.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NUM_ADDED = 2           # <image>, <|endofchunk|>
INIT_STD = 0.02         # Phi-3's initializer_range, for rows added to a pretrained LLM


class AddedEmbedding(nn.Module):
    """Input embeddings of a vocabulary of B base ids (the LLM's table) + :data:`NUM_ADDED` added ids."""

    def __init__(self, hidden_size: int, num_base_ids: int):
        super().__init__()
        self.num_base_ids = num_base_ids
        self.weight = nn.Parameter(torch.empty(NUM_ADDED, hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=INIT_STD)

    def forward(self, input_ids: torch.Tensor, base: nn.Embedding) -> torch.Tensor:
        added = input_ids >= self.num_base_ids
        embeds = base(input_ids.clamp(max=self.num_base_ids - 1))
        extra = F.embedding((input_ids - self.num_base_ids).clamp(min=0, max=NUM_ADDED - 1), self.weight)
        return torch.where(added[..., None], extra.to(embeds.dtype), embeds)


class AddedOutput(nn.Module):
    """Logits over B base ids (the LLM's output rows plus a bias) and the :data:`NUM_ADDED` added ids."""

    def __init__(self, hidden_size: int, table_rows: int, num_base_ids: int):
        super().__init__()
        self.num_base_ids = num_base_ids
        self.base_bias = nn.Parameter(torch.empty(table_rows))    # bias of the LLM's output rows
        self.head = nn.Linear(hidden_size, NUM_ADDED, bias=True)  # the added tokens' rows
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.base_bias)
        nn.init.normal_(self.head.weight, std=INIT_STD)
        nn.init.zeros_(self.head.bias)

    def forward(self, hidden: torch.Tensor, base: nn.Linear) -> torch.Tensor:
        base_logits = (base(hidden) + self.base_bias.to(hidden.dtype))[..., :self.num_base_ids]
        return torch.cat([base_logits, self.head(hidden)], dim=-1)


__all__ = ["NUM_ADDED", "AddedEmbedding", "AddedOutput"]

"""Shared-prefix packing: tokens that several sequences share go through the transformer once.

A preference pair's chosen and rejected responses follow the same prompt, and RL's k samples
of a prompt follow that prompt. Unpacked, the prompt is computed once per sequence. Packed, a
row holds the shared prefix once and every continuation after it:

    row:        [ prefix | continuation 1 | continuation 2 | ... | pad ]
    positions:    0..P-1   P..P+n1-1        P..P+n2-1

and a 4D attention mask lets a continuation's tokens see the prefix and their own earlier
tokens only. Every token then has the same inputs, positions and visible context as in its own
unpacked sequence, so its hidden state is the same (up to the order of floating-point sums).

Only causal decoders can be packed (an encoder's prefix tokens attend to what follows them), only
under attention implementations that take a 4D mask (`sdpa`, `eager`), and only the model families
tested packed against unpacked; anything else (BERT, flash-attention kernels, other families)
keeps the unpacked path. :func:`can_pack` decides.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

MASKABLE = ("sdpa", "eager")  # attention implementations that read a 4D mask as given
PACKABLE = ("llama", "qwen2")  # model families tested packed against unpacked (tests/test_packing.py)


def common_prefix(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the prefix all `sequences` share, leaving every one at least one token of its own
    (a continuation's last token is what a reward model reads)."""
    shortest = min(len(s) for s in sequences)
    n = 0
    while n < shortest - 1 and all(s[n] == sequences[0][n] for s in sequences):
        n += 1
    return n


@dataclass
class Packed:
    """Rows of [prefix | continuations...], right-padded. Per sequence, in the order given: its `rows`,
    the column of its `prefix_ends` (the prefix's last token; -1 without a prefix), `starts` (its first
    own token) and `ends` (its last token)."""

    input_ids: torch.Tensor       # [R, L]
    position_ids: torch.Tensor    # [R, L]
    attention_mask: torch.Tensor  # [R, 1, L, L] bool: True where a query may attend to a key
    rows: torch.Tensor            # [n]
    prefix_ends: torch.Tensor     # [n]
    starts: torch.Tensor          # [n]
    ends: torch.Tensor            # [n]


def split_rows(prefix_length: int, lengths: Sequence[int], hidden_size: Optional[int]) -> list[list[int]]:
    """How one group's continuations share rows: m runs of consecutive continuations of (nearly) equal
    count, each run a row after its own copy of the prefix, with the m that costs least. A row of L
    tokens costs L (the projections and MLP, ~24 h^2 FLOPs a token in a forward) + L^2 / (6 h)
    (attention over its L keys, ~4 h FLOPs a pair): short continuations share one row; long ones,
    which would make one row's attention dearer than repeating the prefix, are spread over more
    rows. The padding of the batch's rows to its widest row is not in the cost. All in one row
    without `hidden_size`."""
    n = len(lengths)
    if hidden_size is None:
        return [list(range(n))]
    best: Optional[tuple[float, list[list[int]]]] = None
    for m in range(1, n + 1):
        parts = [list(range(i * n // m, (i + 1) * n // m)) for i in range(m)]
        cost = 0.0
        for part in parts:
            width = prefix_length + sum(lengths[j] for j in part)
            cost += width + width * width / (6 * hidden_size)
        if best is None or cost < best[0]:
            best = (cost, parts)
    return best[1]


def pack(groups: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]], pad_id: int,
         hidden_size: Optional[int] = None) -> Packed:
    """Rows of (prefix, continuations) groups: the prefix, then each (non-empty) continuation. A group
    takes one row, or with `hidden_size` (the model's) as many as :func:`split_rows` finds cheapest.
    Sequence i of the result is the i-th continuation, counting group by group."""
    layouts, width = [], 0
    for prefix, continuations in groups:
        if not continuations or any(len(c) == 0 for c in continuations):
            raise ValueError("pack needs at least one continuation per group, none of them empty")
        p = len(prefix)
        for part in split_rows(p, [len(c) for c in continuations], hidden_size):
            row, segment, position, spans = list(prefix), [0] * p, list(range(p)), []
            for j, i in enumerate(part, start=1):
                own = continuations[i]
                spans.append((len(row), len(row) + len(own) - 1))
                row += list(own)
                segment += [j] * len(own)
                position += range(p, p + len(own))
            layouts.append((row, segment, position, spans, p))
            width = max(width, len(row))
    n_rows = len(layouts)
    ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
    segments = torch.full((n_rows, width), -1, dtype=torch.long)
    positions = torch.zeros((n_rows, width), dtype=torch.long)
    rows, prefix_ends, starts, ends = [], [], [], []
    for r, (row, segment, position, spans, p) in enumerate(layouts):
        ids[r, :len(row)] = torch.tensor(row)
        segments[r, :len(row)] = torch.tensor(segment)
        positions[r, :len(row)] = torch.tensor(position)
        for start, end in spans:
            rows.append(r)
            prefix_ends.append(p - 1)
            starts.append(start)
            ends.append(end)
    query, key = segments[:, :, None], segments[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    visible = causal & (key != -1) & ((key == 0) | (key == query))
    visible |= torch.eye(width, dtype=torch.bool)  # a pad query sees itself: no row of the softmax is empty
    return Packed(ids, positions, visible[:, None], torch.tensor(rows), torch.tensor(prefix_ends),
                  torch.tensor(starts), torch.tensor(ends))


def pack_shared(groups: Sequence[Sequence[Sequence[int]]], pad_id: int, hidden_size: Optional[int] = None) -> Packed:
    """:func:`pack` with each group's prefix found: the tokens all its sequences begin with (:func:`common_prefix`)."""
    split = []
    for group in groups:
        if not group or any(len(s) == 0 for s in group):
            raise ValueError("pack_shared needs non-empty groups of non-empty sequences")
        p = common_prefix(group)
        split.append((group[0][:p], [s[p:] for s in group]))
    return pack(split, pad_id, hidden_size)


def can_pack(model: nn.Module) -> bool:
    """A Llama- or Qwen2-family decoder (SmolLM2, Llama, Qwen2.5: the families the packed path is tested
    on) under an attention implementation that takes a 4D mask; a transformers model, its body, or a
    PEFT wrapper around either."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    config = getattr(model, "config", None)
    # a sliding window is a mask of its own, which a given 4D mask would replace
    windowed = getattr(config, "use_sliding_window", False) or "sliding_attention" in (getattr(config, "layer_types", None) or ())
    return (getattr(config, "model_type", None) in PACKABLE and not getattr(config, "is_encoder_decoder", False)
            and getattr(config, "_attn_implementation", None) in MASKABLE and not windowed)


def attention_mask_for(model: nn.Module, packed: Packed, dtype: torch.dtype) -> torch.Tensor:
    """The packed mask as `model`'s attention reads it: boolean for sdpa, additive (0 / min) for eager."""
    mask = packed.attention_mask
    if model.config._attn_implementation == "eager":
        return torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
    return mask


def packed_hidden(body: nn.Module, packed: Packed) -> torch.Tensor:
    """The transformer body's last hidden states over the packed rows, [R, L, H]."""
    device = next(body.parameters()).device
    dtype = next(p for p in body.parameters() if p.is_floating_point()).dtype
    return body(input_ids=packed.input_ids.to(device), position_ids=packed.position_ids.to(device),
                attention_mask=attention_mask_for(body, packed, dtype).to(device), use_cache=False).last_hidden_state


def read_packed_scores(body: nn.Module, head: nn.Module, packed: Packed) -> torch.Tensor:
    """`head(h)` at every packed sequence's last token: one float32 score per sequence, in order
    (what :func:`perl_core.scoring.read_scores` gives each sequence unpacked)."""
    hidden = packed_hidden(body, packed)
    h = hidden[packed.rows.to(hidden.device), packed.ends.to(hidden.device)]
    return head(h.to(next(head.parameters()).dtype))[:, 0].float()


def plain_logits(model: nn.Module) -> bool:
    """Whether `model`'s logits are its output embedding applied to the last hidden state and nothing
    else (no final soft-capping or logit scale), so :func:`packed_token_logits` may compute them."""
    config = model.config
    return (model.get_output_embeddings() is not None and getattr(config, "final_logit_softcapping", None) is None
            and getattr(config, "logit_scale", None) is None and getattr(config, "logits_scaling", None) is None)


def packed_token_logits(model: nn.Module, packed: Packed, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits that predict each continuation's tokens: [n, width, vocab] where [i, t] predicts token t of
    continuation i (t = 0 from its prefix's last token), and the hidden state at that prefix token, [n, H].

    `model` is a causal LM (`*ForCausalLM`, LoRA layers inside it active as they are); positions past a
    continuation's end hold some valid column's logits, for the caller to mask."""
    if bool((packed.prefix_ends < 0).any()):
        raise ValueError("packed_token_logits needs a prefix (the prompt) in every row: its last token predicts token 0")
    hidden = packed_hidden(model.base_model, packed)
    t = torch.arange(width)
    cols = torch.minimum(packed.starts[:, None] + t - 1, packed.ends[:, None])
    cols[:, 0] = packed.prefix_ends
    rows = packed.rows.to(hidden.device)
    h = hidden[rows[:, None], cols.to(hidden.device)]
    return model.get_output_embeddings()(h), hidden[rows, packed.prefix_ends.to(hidden.device)]

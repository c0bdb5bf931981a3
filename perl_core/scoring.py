"""The one way a reward model reads text.

A causal-LM reward model scores a token sequence with its scalar head applied to the final
(normed) hidden state at the sequence's LAST ATTENDED position, the token that ends the
response (eos, or the chat template's end-of-turn: `modeling.response_end_id`). The position
comes from the attention mask, never from the pad id: SmolLM2 and Qwen2.5 ship pad == eos, and
transformers' `*ForSequenceClassification` ("last token that is not pad") would then read the
response's last token instead of the end token the reward model was trained on. Position ids
skip left padding exactly as `generate` does, so a left-padded batch (RL samples) and a
right-padded one (reward training, :class:`~perl_core.reward.train.RewardScorer`) give the same
scores. Reward training, `RewardScorer`, the one-backbone RL reward
(`policy.roles.OneBackbone.reward`) and evaluation all score through :func:`read_scores`;
pairwise training reads a pair's chosen and rejected sequences through :func:`pair_scores`, which
computes their shared prompt once (`perl_core.packing`) and reads the same positions.

Encoders (BERT, MiniLM) read their pooled [CLS] at position 0 and mask their pads; they keep
the model's own forward.

An empty response (the policy wrote the end token first) is scored as what was written:
prompt + end token, with no response tokens, on every path.
"""
from __future__ import annotations

import torch
from torch import nn

from perl_core.modeling import pad_rows
from perl_core.packing import can_pack, pack_shared, read_packed_scores

ENCODER_HEAD = "classifier"  # BERT-style heads read the pooled [CLS]; causal LMs name theirs `score`


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, exactly as `generate` computes them (so log-probs match sampling)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 0)


def last_attended(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position with mask 1 in each row: the position a reward model reads.

    Correct under left padding, right padding, and masks that end in zeros after an early EOS.
    """
    width = attention_mask.shape[-1]
    return width - 1 - attention_mask.long().flip(-1).argmax(-1)


def read_scores(body: nn.Module, head: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """`head(h_last)` for a transformer `body` (LlamaModel, Qwen2Model, ...): one float32 score per row."""
    device = next(body.parameters()).device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    hidden = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                  use_cache=False).last_hidden_state
    last = last_attended(attention_mask).to(hidden.device)
    h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return head(h.to(next(head.parameters()).dtype))[:, 0].float()


def classifier_of(model: nn.Module) -> nn.Module:
    """The `*ForSequenceClassification` inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_encoder_head(head: str) -> bool:
    """Whether a reward head (its module name, as a manifest records it) is an encoder's, read at [CLS]."""
    return head == ENCODER_HEAD


def has_encoder_head(model: nn.Module) -> bool:
    """Whether `model` (PEFT-wrapped or not) scores with an encoder's head."""
    return isinstance(getattr(classifier_of(model), ENCODER_HEAD, None), nn.Module)


def sequence_scores(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scores of a sequence classifier (a reward model folder's model, LoRA-wrapped or not), one per row."""
    inner = classifier_of(model)
    if has_encoder_head(model):
        device = next(model.parameters()).device
        return model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits[:, 0].float()
    # the transformer body (`model.model` for Llama/Qwen) and the `score` head, LoRA layers active
    return read_scores(inner.base_model, inner.score, input_ids, attention_mask)


def pair_scores(model: nn.Module, pairs, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) scores of (chosen_ids, rejected_ids) pairs. A causal reward model reads each
    pair as one packed row, the shared prompt computed once (`perl_core.packing`); the scores are
    those of :func:`sequence_scores` on each sequence alone."""
    inner = classifier_of(model)
    if not has_encoder_head(model) and can_pack(inner):
        scores = read_packed_scores(inner.base_model, inner.score, pack_shared(pairs, pad_id, inner.config.hidden_size))
        return scores[0::2], scores[1::2]
    n = len(pairs)
    scores = sequence_scores(model, *pad_rows([c for c, _ in pairs] + [r for _, r in pairs], pad_id, side="right"))
    return scores[:n], scores[n:]

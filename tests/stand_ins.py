"""Known inputs without training: RL samples built from text, and a stand-in LoRA reward model."""
from __future__ import annotations

from pathlib import Path

import torch

from perl_core.modeling import encode_prompt, pad_rows
from perl_core.policy.generation import Samples


def samples_from_text(tokenizer, prompts, responses, end_id=None, cut=()) -> Samples:
    """Left-padded prompts, then each response's ids + the end token (`end_id`, eos by default; none for
    rows in `cut`, as when max_new_tokens stops a response), right-padded: the layout `generate` returns."""
    end_id = tokenizer.eos_token_id if end_id is None else end_id
    prompt_ids, mask = pad_rows([encode_prompt(tokenizer, p) for p in prompts], tokenizer.pad_token_id, side="left")
    resp = [tokenizer(r, add_special_tokens=False)["input_ids"] + ([] if i in cut else [end_id])
            for i, r in enumerate(responses)]
    r_ids, r_mask = pad_rows(resp, tokenizer.pad_token_id, side="right")
    finished = torch.tensor([i not in cut for i in range(len(resp))])
    return Samples(torch.cat([prompt_ids, r_ids], 1), torch.cat([mask, r_mask], 1), r_mask, prompt_ids.shape[1],
                   finished)


def stand_in_reward_model(anchor: Path, out: Path, lora=None, fit_vocab: bool = False) -> Path:
    """A LoRA reward model on `anchor` with random adapter and head weights (seed 3), saved in the reward
    stage's format at `out`. `fit_vocab` resizes the embeddings to the tokenizer first (chat tokens)."""
    from perl_core.config import PerlConfig
    from perl_core.modeling import attach_lora, fit_embeddings, load_sequence_scorer, load_tokenizer
    from perl_core.reward.train import save_reward_model

    tok = load_tokenizer(str(anchor))
    model = load_sequence_scorer(str(anchor), tok.pad_token_id)
    if fit_vocab:
        model = fit_embeddings(model, tok)
    rm = attach_lora(model, lora or PerlConfig().reward.lora, "SEQ_CLS", modules_to_save=["score"])
    torch.manual_seed(3)
    with torch.no_grad():  # a fresh LoRA is a no-op; give the stand-in adapter real weights
        for name, p in rm.named_parameters():
            if "lora_B" in name or "score" in name:
                p.normal_(0, 0.5)
    save_reward_model(rm, tok, out, PerlConfig(), base=str(anchor), head="score", metrics={})
    return out

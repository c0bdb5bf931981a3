"""RL samples built from known text, without sampling: what a test feeds the RL step or a scorer."""
from __future__ import annotations

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

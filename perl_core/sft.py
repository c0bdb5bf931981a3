"""The anchor policy: supervised fine-tuning on `sft` rows, loss on response tokens only.

    loss = - (1 / #response tokens) * sum_{t in response} log pi(y_t | prompt, y_<t)

Prompt tokens and padding carry no loss (the model learns to answer, not to ask); the token that
ends the response (eos, or the chat template's end-of-turn when the backbone has a template and
`data.chat_template` is auto) does, so the anchor learns to stop where RL and the reward model
expect it (`modeling.encode_pair`). `full`
tuning is the default for scratch backbones, which start random; `lora` trains an adapter
and saves MERGED weights, so the anchor is always a plain Hugging Face causal-LM folder that
the reward model and the policy can both start from.
"""
from __future__ import annotations

import math
import random
from pathlib import Path

import torch
import torch.nn.functional as F

from perl_core import parallel
from perl_core.artifacts import StageResult, write_manifest
from perl_core.callbacks import MetricsCallback, null_callback
from perl_core.config import PerlConfig
from perl_core import data as data_api
from perl_core.data import versioning
from perl_core.devices import autocast_dtype, enable_gradient_checkpointing, run_device
from perl_core.errors import UserError
from perl_core.modeling import (attach_lora, encode_pair, fit_embeddings, load_causal_lm, load_tokenizer,
                                pad_rows, parameter_counts, resolve_backbone)
from perl_core.training import eval_subset, set_seed, train_loop


def encode_rows(tokenizer, rows: list[dict], max_length: int) -> tuple[list[tuple[list[int], int]], int]:
    """(ids, response_start) per row; rows longer than `max_length` are dropped and counted."""
    encoded, dropped = [], 0
    for row in rows:
        try:
            encoded.append(encode_pair(tokenizer, row["prompt"], row["response"], max_length))
        except ValueError:
            dropped += 1
    return encoded, dropped


def collate(examples: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids and a mask over the tokens that carry loss (response tokens incl. EOS)."""
    input_ids, attention_mask = pad_rows([ids for ids, _ in examples], pad_id, side="right")
    loss_mask = torch.zeros_like(input_ids)
    for i, (ids, start) in enumerate(examples):
        loss_mask[i, start:len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def response_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    device = next(model.parameters()).device
    ids, attn, mask = (batch[k].to(device) for k in ("input_ids", "attention_mask", "loss_mask"))
    logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1]
    targets, target_mask = ids[:, 1:], mask[:, 1:].float()  # token t is predicted from position t-1
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="none")
    n_tokens = target_mask.sum().clamp(min=1)
    loss = (nll.view_as(target_mask) * target_mask).sum() / n_tokens
    # a mean over response tokens: processes sharing a batch weigh their losses by their token counts
    return loss, {"batch_size": ids.shape[0], "response_tokens": float(n_tokens), "loss_weight": float(n_tokens)}


def batch_stream(examples: list, batch_size: int, seed: int):
    """`batches(epoch)` for `train_loop`, lists of examples: the order depends only on (seed, epoch),
    so resume is exact (and the processes of a launch shard the same batches)."""
    def batches(epoch: int):
        order = list(range(len(examples)))
        random.Random(seed * 1000003 + epoch).shuffle(order)
        for i in range(0, len(order), batch_size):
            yield [examples[j] for j in order[i:i + batch_size]]
    return batches


@torch.no_grad()
def validation_loss(model, examples: list, batch_size: int, pad_id: int) -> dict[str, float]:
    total, tokens = 0.0, 0.0
    for i in range(0, len(examples), batch_size):
        loss, m = response_loss(model, collate(examples[i:i + batch_size], pad_id))
        total += float(loss) * m["response_tokens"]
        tokens += m["response_tokens"]
    nll = total / max(tokens, 1.0)
    return {"loss": nll, "perplexity": math.exp(min(nll, 50.0))}


def train_anchor(cfg: PerlConfig, out_dir: str | Path, callback: MetricsCallback = null_callback,
                 resume: bool = False) -> StageResult:
    """SFT the backbone on `sft` rows into `out_dir` (HF causal LM + tokenizer + manifest kind `anchor`)."""

    out_dir = Path(out_dir)
    sft = cfg.sft
    device = run_device()
    if sft.enabled:  # refuse before any work
        autocast_dtype(sft.train.precision, device, "sft.train.precision")
        parallel.per_process(sft.train.batch_size, "sft.train.batch_size")
    with parallel.main_first():  # a scratch backbone is built once, by the main process
        base = resolve_backbone(sft.backbone, cfg.artifacts_dir, data_api.corpus(cfg.data))
    tokenizer = load_tokenizer(base, chat_template=cfg.data.chat_template)
    set_seed(sft.train.seed)  # a new pad row and the fresh adapter's initialisation are part of the run's seed
    model = fit_embeddings(load_causal_lm(base, sft.backbone.dtype), tokenizer)
    metrics: dict[str, float] = {}
    if sft.enabled:
        train, dropped = encode_rows(tokenizer, data_api.load_rows(cfg.data, "sft", "train"), sft.max_length)
        val, val_dropped = encode_rows(tokenizer, data_api.load_rows(cfg.data, "sft", "validation"), sft.max_length)
        val = [val[i] for i in eval_subset(len(val), sft.eval_examples, sft.train.seed)]
        if not train:
            raise UserError(f"sft: no training row fits sft.max_length={sft.max_length} tokens "
                            f"({dropped} dropped); raise sft.max_length")
        if not val and sft.train.early_stopping_patience is not None:
            raise UserError("sft.train.early_stopping_patience needs validation rows to stop on, but no sft "
                            f"validation row fits sft.max_length={sft.max_length} tokens ({val_dropped} dropped)")
        if sft.tuning == "lora":
            model = attach_lora(model, sft.lora, task_type="CAUSAL_LM")
        if sft.train.gradient_checkpointing:
            enable_gradient_checkpointing(model, lora=sft.tuning == "lora")
        model.to(device)
        counts = parameter_counts(model)
        pad_id = tokenizer.pad_token_id
        batches = batch_stream(train, sft.train.batch_size, sft.train.seed)
        eval_fn = (lambda m: validation_loss(m, val, sft.train.batch_size, pad_id)) if val else None
        result = train_loop(model, batches, lambda m, rows: response_loss(m, collate(rows, pad_id)), sft.train,
                            eval_fn=eval_fn,
                            eval_metric="loss" if val else None, eval_mode="min", callback=callback,
                            checkpoint_dir=out_dir / "checkpoints", resume=resume, desc="sft")
        if sft.tuning == "lora":
            model = model.merge_and_unload()  # the anchor is a plain causal LM: RM and policy start from it
        metrics = {f"val_{k}": v for k, v in result.last_eval.items()}
        metrics.update(steps=result.step, seconds=result.seconds, train_rows=len(train), dropped_rows=dropped + val_dropped,
                       trainable_params=counts["trainable"], total_params=counts["total"])
        if result.best_metric is not None:
            metrics["best_val_loss"] = result.best_metric
    if parallel.is_main():
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
        write_manifest(out_dir, kind="anchor", base_model=base, tuning=sft.tuning if sft.enabled else "none",
                       config=sft.model_dump(mode="json") | {"generation": cfg.policy.generation.model_dump()},
                       data_version=versioning.recorded_version(), metrics=metrics)
    parallel.barrier()  # the anchor is whole before any process goes on to read it
    return StageResult(out_dir, metrics, {"anchor": out_dir})

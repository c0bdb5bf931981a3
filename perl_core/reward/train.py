"""Reward model: a scalar head on any backbone, trained pairwise (Bradley-Terry) or pointwise (BCE).

    pairwise   L = -log sigma(r(x, y_chosen) - r(x, y_rejected) - margin)
    pointwise  L = BCE(sigma(r(x, y)), label),  label = 1 for thumbs up, 0 for thumbs down

PERL trains it with LoRA on the attention projections while the score head trains fully
(peft `modules_to_save`): a causal LM reads the score at the token that ends the response, its
last attended position (`score` head, :mod:`perl_core.scoring`), an encoder at its pooled [CLS]
(`classifier` head). Chosen and rejected go through ONE batched forward pass; batches are
right-padded and length-bucketed, and padding never changes a score.

The artifact folder is a PEFT adapter whose saved modules include the head (`tuning: lora`)
or an ordinary Hugging Face model (`tuning: full`), plus the tokenizer and `manifest.json`.
:class:`RewardScorer` loads either, merges the adapter, and scores (prompt, response) pairs.
"""
from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from perl_core import data as data_api
from perl_core import parallel
from perl_core import metrics as M
from perl_core.artifacts import StageResult, read_manifest, write_manifest
from perl_core.callbacks import MetricsCallback, null_callback
from perl_core.config import ConfigError, PerlConfig
from perl_core.data import versioning
from perl_core.devices import autocast, autocast_dtype, enable_gradient_checkpointing, run_device
from perl_core.errors import DataError, UserError
from perl_core.modeling import (attach_lora, encode_pair, fit_embeddings, load_sequence_scorer, load_tokenizer,
                                pad_rows, parameter_counts, quiet_transformers, resolve_backbone, response_end_id)
from perl_core.scoring import ENCODER_HEAD, is_encoder_head, pair_scores, sequence_scores
from perl_core.training import eval_subset, set_seed, train_loop

HEAD_NAMES = ("score", ENCODER_HEAD)  # Llama/Qwen/GPT-style heads vs BERT-style heads


# ---------------------------------------------------------------- losses
def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Mean of -log sigma(r_chosen - r_rejected - margin) (logsigmoid keeps large gaps finite)."""
    return -F.logsigmoid(r_chosen - r_rejected - margin).mean()


def pointwise_bce_loss(scores: torch.Tensor, labels: torch.Tensor,
                       weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Binary cross-entropy of sigma(score) against labels in {0, 1}; `weights` per example (class balance)."""
    labels = labels.to(scores.dtype)
    if scores.numel() == 0:
        raise UserError("pointwise_bce_loss got an empty batch")
    bad = ((labels != 0) & (labels != 1)).nonzero()
    if bad.numel():
        i = int(bad[0])
        raise UserError(f"label[{i}] is {float(labels[i]):g}; pointwise labels must be 0 (thumbs down) or 1 (thumbs up)")
    per_example = F.binary_cross_entropy_with_logits(scores, labels, reduction="none")
    if weights is None:
        return per_example.mean()
    return (per_example * weights).sum() / weights.sum()


# ---------------------------------------------------------------- model pieces
def head_name(model: nn.Module) -> str:
    """The scalar head's module name (`score` for causal LMs, `classifier` for encoders)."""
    for name in HEAD_NAMES:
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    raise UserError(f"{type(model).__name__} has no reward head named one of {HEAD_NAMES}")


def head_modules(model: nn.Module, head: str) -> list[str]:
    """What trains fully beside LoRA: the head, and for BERT-style encoders the pooler that feeds it.

    The classifier reads tanh(W [CLS]); a sentence-embedding checkpoint (MiniLM, mean pooling) ships
    that W barely trained (std 0.009, zero bias), so a frozen pooler hands the head an almost
    constant input and LoRA cannot learn (docs/reward.md). Full tuning trains it anyway.
    """
    if not is_encoder_head(head):
        return [head]
    return [head] + sorted({name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name.endswith("pooler")})


def max_positions(model: nn.Module) -> Optional[int]:
    return getattr(model.config, "max_position_embeddings", None)


def encode_example(tokenizer, prompt: str, response: str, max_length: int, encoder: bool,
                   truncation: str = "error") -> list[int]:
    """Token ids the reward model reads for (prompt, response); see `fit_example`."""
    return fit_example(tokenizer, prompt, response, max_length, encoder, truncation)[0]


def fit_example(tokenizer, prompt: str, response: str, max_length: int, encoder: bool,
                truncation: str = "error") -> tuple[list[int], int, int]:
    """Token ids the reward model reads for (prompt, response), and how many prompt and response
    tokens were cut to fit `max_length`.

    Causal LMs: `encode_pair` (prompt + response + end, chat-rendered when the tokenizer has a
    template), so the reward model reads exactly what the policy writes. Encoders read their
    score at position 0, so they take the tokenizer's own pair template ([CLS] prompt [SEP]
    response [SEP]). An empty response is read as it was written: no response tokens. Too long:
    `truncation="error"` raises ValueError; "left" drops the oldest prompt tokens, never the
    response; "both" also cuts the response's end (as TRL does), the longer of the two giving
    way first, so each keeps at least half the room when it needs it. The framing tokens
    (bos and the end token, [CLS]/[SEP]) always stay: the score is read where training read it.
    """
    if encoder:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r = tokenizer(response, add_special_tokens=False)["input_ids"]
        cls = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
        sep = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
        if cls is None or sep is None:
            raise ValueError("the encoder's tokenizer has no [CLS]/[SEP] (or bos/eos) token to frame the pair")
        head, mid, tail = [cls], [sep], [sep]
    else:
        full, start = encode_pair(tokenizer, prompt, response, 10**9)
        head = full[:1] if start and full[0] == tokenizer.bos_token_id else []
        tail = full[-1:] if response_end_id(tokenizer) is not None else []  # encode_pair's end token
        p, r, mid = full[len(head):start], full[start:len(full) - len(tail)], []
    room = max_length - len(head) - len(mid) - len(tail)
    if len(p) + len(r) <= room:
        keep_p, keep_r = len(p), len(r)
    elif truncation == "left" and len(r) <= room:
        keep_p, keep_r = room - len(r), len(r)
    elif truncation == "both":
        keep_p = min(len(p), max(room - len(r), room // 2))
        keep_r = min(len(r), room - keep_p)
    else:
        whole = max_length - room + len(p) + len(r)
        detail = f" (the response alone takes {len(r)})" if truncation == "left" else ""
        raise ValueError(f"sequence of {whole} tokens is longer than max_length={max_length}{detail}")
    ids = head + p[len(p) - keep_p:] + mid + r[:keep_r] + tail
    return ids, len(p) - keep_p, len(r) - keep_r


def score_sequences(model: nn.Module, sequences: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """One forward pass over right-padded `sequences`; one float32 score each (`scoring.sequence_scores`)."""
    return sequence_scores(model, *pad_rows(sequences, pad_id, side="right"))


def length_buckets(lengths: Sequence[int], batch_size: int, seed: int, shuffle: bool = True) -> list[list[int]]:
    """Batches of indices with similar lengths (less padding).

    Shuffled, then sorted within windows of 50 batches, cut, and the batches shuffled: the
    order depends only on `seed`, which the training loop's exact resume relies on.
    """
    order = list(range(len(lengths)))
    if not shuffle:
        order.sort(key=lambda i: lengths[i])
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    rng = random.Random(seed)
    rng.shuffle(order)
    window = batch_size * 50
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


# ---------------------------------------------------------------- data
def row_keys(rows: Sequence[dict], view: str) -> list[str]:
    """Each preference row's identity from its text: a dataset's `id` may be missing or shared by
    several pairs of one conversation, the text is not. A repeated row gets `#2`, `#3`, ... in order,
    so two evaluations of the same split agree on every key."""
    fields = ("prompt", "chosen", "rejected") if view == "pairwise" else ("prompt", "response", "label")
    keys, seen = [], {}
    for row in rows:
        key = hashlib.sha1("\x1f".join(str(row[f]) for f in fields).encode("utf-8")).hexdigest()[:16]
        seen[key] = seen.get(key, 0) + 1
        keys.append(key if seen[key] == 1 else f"{key}#{seen[key]}")
    return keys


def score_rows(rows: Sequence[dict], scores, view: str, row_numbers: Optional[Sequence[int]] = None) -> list[dict]:
    """Per-row scores as evaluations save them: pairwise `scores` are [chosen..., rejected...] (what
    :func:`score_examples` returns), pointwise one per row. `row` is the 1-based line in the split file."""
    s = [float(x) for x in (scores.detach().float().cpu().tolist() if hasattr(scores, "detach") else scores)]
    numbers = list(row_numbers) if row_numbers is not None else range(1, len(rows) + 1)
    n = len(rows)
    out = []
    for i, (row, key, number) in enumerate(zip(rows, row_keys(rows, view), numbers)):
        entry = {"row": int(number), "id": row.get("id"), "key": key}
        if view == "pairwise":
            entry.update(chosen=s[i], rejected=s[n + i])
        else:
            entry.update(label=int(row["label"]), score=s[i])
        out.append(entry)
    return out


def _split_file(cfg: PerlConfig, view: str, split: str) -> str:
    return str(Path(cfg.data.data_dir) / (cfg.data.name or cfg.data.source) / view / f"{split}.jsonl")


def encode_rows(rows: list[dict], tokenizer, cfg: PerlConfig, encoder: bool, split: str) -> tuple[list[tuple], dict]:
    """Pairwise rows -> (chosen_ids, rejected_ids); pointwise rows -> (ids, label). Errors name file/row/field.

    Also returns how many rows `reward.truncation` cut: {"prompts": n, "responses": n} (a pair counts
    once when either of its sequences was cut)."""
    rcfg = cfg.reward
    view = rcfg.objective
    file = _split_file(cfg, view, split)
    fields = ("chosen", "rejected") if view == "pairwise" else ("response",)
    out, truncated = [], {"prompts": 0, "responses": 0}
    for i, row in enumerate(rows):
        for key in ("prompt",) + fields + (("label",) if view == "pointwise" else ()):
            if key not in row:
                raise DataError(f"missing {key!r}; {view} rows need prompt, {', '.join(fields)}"
                                + (", label" if view == "pointwise" else ""), file=file, row=i + 1, field=key)
        encoded, cut_prompt, cut_response = [], 0, 0
        for key in fields:
            if not isinstance(row[key], str) or not row[key].strip():
                raise DataError("empty response: every reward example needs a non-empty reply", file=file, row=i + 1, field=key)
            try:
                ids, cut_p, cut_r = fit_example(tokenizer, row["prompt"], row[key], rcfg.max_length, encoder,
                                                rcfg.truncation)
            except ValueError as err:
                raise DataError(f"{err}; raise reward.max_length, set reward.truncation=left (cut the prompt's start) "
                                "or both (the response's end too), or filter long rows with data.max_tokens",
                                file=file, row=i + 1, field=key) from None
            encoded.append(ids)
            cut_prompt, cut_response = cut_prompt + cut_p, cut_response + cut_r
        truncated["prompts"] += cut_prompt > 0
        truncated["responses"] += cut_response > 0
        if view == "pointwise":
            label = row["label"]
            if label not in (0, 1):
                raise DataError(f"label is {label!r}; expected 0 (thumbs down) or 1 (thumbs up)", file=file, row=i + 1, field="label")
            encoded.append(int(label))
        out.append(tuple(encoded))
    if not out:
        raise DataError(f"the {split} split is empty", file=file)
    return out, truncated


# ---------------------------------------------------------------- building and evaluating
def build_reward_model(base: str, cfg: PerlConfig, tokenizer) -> tuple[nn.Module, str]:
    """The sequence scorer on `base`, wrapped with LoRA (head in modules_to_save) when tuning=lora."""
    rcfg = cfg.reward
    set_seed(rcfg.train.seed)  # the fresh head's init is part of the run's seed
    with quiet_transformers():
        model = fit_embeddings(load_sequence_scorer(base, tokenizer.pad_token_id, rcfg.backbone.dtype), tokenizer)
    limit = max_positions(model)
    if limit is not None and rcfg.max_length > limit:
        raise ConfigError(f"reward.max_length={rcfg.max_length} is longer than {base} allows ({limit} positions)")
    head = head_name(model)
    if rcfg.tuning == "lora":
        model = attach_lora(model, rcfg.lora, "SEQ_CLS", modules_to_save=head_modules(model, head))
    if rcfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(model, lora=rcfg.tuning == "lora")
    return model.to(run_device()), head


def reward_metrics(scores: torch.Tensor, examples: list[tuple], objective: str, margin: float = 0.0) -> dict[str, float]:
    """Pairwise: accuracy, loss, reward mean/std. Pointwise: ROC-AUC, balanced accuracy, accuracy, ECE, loss."""
    scores = scores.detach().float().cpu()
    out = {"reward_mean": float(scores.mean()), "reward_std": float(scores.std()) if scores.numel() > 1 else 0.0}
    if objective == "pairwise":
        n = len(examples)
        rc, rr = scores[:n], scores[n:]
        out.update(pairwise_accuracy=M.pairwise_accuracy(rc, rr), loss=float(bradley_terry_loss(rc, rr, margin)))
        return out
    labels = torch.tensor([e[1] for e in examples], dtype=torch.float32)
    probs = torch.sigmoid(scores)
    out.update(loss=float(pointwise_bce_loss(scores, labels)), accuracy=M.accuracy(probs, labels, threshold=0.5),
               balanced_accuracy=M.balanced_accuracy(probs, labels, threshold=0.5),
               ece=M.expected_calibration_error(probs, labels))
    out["roc_auc"] = M.roc_auc(scores, labels) if 0 < labels.sum() < len(labels) else float("nan")
    return out


@torch.no_grad()
def score_examples(model: nn.Module, examples: list[tuple], objective: str, pad_id: int, batch_size: int) -> torch.Tensor:
    """Scores of every sequence: pairwise -> [chosen..., rejected...]; pointwise -> one per example."""
    seqs = [e[0] for e in examples] + ([e[1] for e in examples] if objective == "pairwise" else [])
    scores = torch.empty(len(seqs))
    for batch in length_buckets([len(s) for s in seqs], batch_size, seed=0, shuffle=False):
        scores[batch] = score_sequences(model, [seqs[i] for i in batch], pad_id).cpu()
    return scores


# ---------------------------------------------------------------- training
def train_reward_model(cfg: PerlConfig, out_dir: str | Path, callback: MetricsCallback = null_callback,
                       resume: bool = False, base_model: Optional[str] = None,
                       train_rows: Optional[list[dict]] = None) -> StageResult:
    """Train the reward model described by `cfg.reward` on `cfg.data` and save it to `out_dir`.

    `base_model` (the anchor folder) replaces the backbone when `reward.init_from_anchor`:
    PERL initialises the reward model from the SFT model. `train_rows` replaces the training
    split (an ensemble member's bootstrap resample).
    """
    rcfg, out = cfg.reward, Path(out_dir)
    objective = rcfg.objective
    autocast_dtype(rcfg.train.precision, run_device(), "reward.train.precision")  # refuse before any work
    parallel.per_process(rcfg.train.batch_size, "reward.train.batch_size")
    if train_rows is None:
        train_rows = data_api.load_rows(cfg.data, objective, "train")
    val_rows = data_api.load_rows(cfg.data, objective, "validation")
    if base_model is not None and rcfg.init_from_anchor:
        base = str(base_model)
    else:
        corpus = data_api.corpus(cfg.data) if rcfg.backbone.name.startswith("scratch:") else None
        with parallel.main_first():  # a scratch backbone is built once, by the main process
            base = resolve_backbone(rcfg.backbone, cfg.artifacts_dir, corpus)
    tokenizer = load_tokenizer(base, chat_template=cfg.data.chat_template)
    model, head = build_reward_model(base, cfg, tokenizer)
    encoder = is_encoder_head(head)
    train, train_cut = encode_rows(train_rows, tokenizer, cfg, encoder, "train")
    val, val_cut = encode_rows(val_rows, tokenizer, cfg, encoder, "validation")
    val_numbers = eval_subset(len(val), rcfg.eval_examples, rcfg.train.seed)
    val = [val[i] for i in val_numbers]
    pad_id = tokenizer.pad_token_id
    bs = rcfg.train.batch_size

    lengths = [max(len(s) for s in e if isinstance(s, list)) for e in train]
    n_pos = sum(e[1] for e in train) if objective == "pointwise" else 0
    # class balance: each class carries half the loss (thumbs-down are rare in real feedback)
    class_weight = {1: len(train) / (2 * max(n_pos, 1)), 0: len(train) / (2 * max(len(train) - n_pos, 1))}

    def batches(epoch: int):
        return [[train[i] for i in idx] for idx in length_buckets(lengths, bs, seed=rcfg.train.seed * 1000 + epoch)]

    def loss_fn(m: nn.Module, batch: list[tuple]):
        if objective == "pairwise":
            rc, rr = pair_scores(m, [(e[0], e[1]) for e in batch], pad_id)
            loss = bradley_terry_loss(rc, rr, rcfg.margin)
            return loss, {"batch_size": len(batch), "pairwise_accuracy": float((rc > rr).float().mean()),
                          "reward_margin": float((rc - rr).detach().mean())}
        scores = score_sequences(m, [e[0] for e in batch], pad_id)
        labels = torch.tensor([e[1] for e in batch], device=scores.device)
        weights = (torch.tensor([class_weight[e[1]] for e in batch], device=scores.device)
                   if rcfg.class_balance else None)
        # a weighted mean: processes sharing a batch weigh their losses by their summed class weights
        weight = float(weights.sum()) if weights is not None else len(batch)
        return pointwise_bce_loss(scores, labels, weights), {"batch_size": len(batch), "loss_weight": weight}

    eval_metric = "pairwise_accuracy" if objective == "pairwise" else "roc_auc"

    last_scores: list[torch.Tensor] = []  # the latest validation pass

    def eval_fn(m: nn.Module) -> dict[str, float]:
        last_scores[:] = [score_examples(m, val, objective, pad_id, bs * 2)]
        return reward_metrics(last_scores[0], val, objective, rcfg.margin)

    result = train_loop(model, batches, loss_fn, rcfg.train, eval_fn=eval_fn, eval_metric=eval_metric,
                        callback=callback, checkpoint_dir=out / "checkpoints", resume=resume, desc="reward model")
    # the loop evaluated the final step; only restored (earlier, better) weights need a new pass
    final = result.last_eval if result.best_step in (None, result.step) and result.last_eval and last_scores \
        else eval_fn(model)
    counts = parameter_counts(model)
    metrics = {f"validation/{k}": v for k, v in final.items()}
    metrics.update(trainable_params=counts["trainable"], total_params=counts["total"], steps=result.step,
                   train_seconds=result.seconds)
    if result.best_step is not None:
        metrics["best_step"] = result.best_step
    if rcfg.truncation != "error":  # rows that were cut to fit reward.max_length, whole splits
        for split, cut in (("train", train_cut), ("validation", val_cut)):
            metrics.update({f"{split}/truncated_{part}": float(n) for part, n in cut.items()})
    if parallel.is_main():
        save_reward_model(model, tokenizer, out, cfg, base=base, head=head, metrics=metrics)
    parallel.barrier()  # the reward model is whole before any process goes on to read it
    return StageResult(out_dir=out, metrics=metrics, artifacts={"reward_model": out})


def save_reward_model(model: nn.Module, tokenizer, out: Path, cfg: PerlConfig, *, base: str, head: str,
                      metrics: dict) -> None:
    rcfg = cfg.reward
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)  # PEFT: adapter + head (modules_to_save); full: HF model
    tokenizer.save_pretrained(out)
    base_ref = str(Path(base).resolve()) if Path(base).exists() else base
    write_manifest(out, kind="reward_model", base_model=base_ref, tuning=rcfg.tuning,
                   config=rcfg.model_dump(mode="json"), data_version=versioning.recorded_version(), metrics=metrics,
                   head=head, objective=rcfg.objective, max_length=rcfg.max_length, truncation=rcfg.truncation,
                   data={"source": cfg.data.source, "name": cfg.data.name or cfg.data.source},
                   adapter_name="default" if rcfg.tuning == "lora" else None)


# ---------------------------------------------------------------- inference
class RewardScorer:
    """Load a reward-model folder (LoRA adapter or full model) and score (prompt, response) pairs."""

    def __init__(self, model: nn.Module, tokenizer, max_length: int, encoder: bool, truncation: str = "error",
                 precision: str = "auto"):
        self.model, self.tokenizer, self.max_length = model.eval(), tokenizer, max_length
        self.encoder, self.truncation, self.precision = encoder, truncation, precision

    @classmethod
    def load(cls, path: str | Path, device: Optional[torch.device] = None, precision: str = "auto") -> "RewardScorer":
        """The folder's reward model on `device` (default: :func:`perl_core.devices.run_device`), scoring under
        `precision` (auto | fp32 | bf16 | fp16, as `reward.train.precision`)."""
        path = Path(path)
        manifest = read_manifest(path, expect_kind="reward_model")
        tokenizer = load_tokenizer(str(path))
        with quiet_transformers():
            if (path / "adapter_config.json").exists():
                from peft import PeftModel

                base = fit_embeddings(load_sequence_scorer(manifest["base_model"], tokenizer.pad_token_id), tokenizer)
                model = PeftModel.from_pretrained(base, str(path)).merge_and_unload()
            else:
                model = fit_embeddings(load_sequence_scorer(str(path), tokenizer.pad_token_id), tokenizer)
        model.to(device or run_device())
        return cls(model, tokenizer, manifest["max_length"], is_encoder_head(manifest["head"]),
                   manifest.get("truncation", "error"), precision)

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 32,
              truncation: Optional[str] = None) -> torch.Tensor:
        """One float32 reward per (prompt, response), in input order, on the CPU.

        An empty response is scored as prompt + end token (`perl_core.scoring`). `truncation`
        overrides the model's own setting (evaluation reads generated text with "left").
        """
        if len(prompts) != len(responses):
            raise UserError(f"score got {len(prompts)} prompts but {len(responses)} responses")
        if not prompts:
            raise UserError("score got an empty batch: pass at least one (prompt, response)")
        seqs = []
        for i, (p, r) in enumerate(zip(prompts, responses)):
            try:
                seqs.append(encode_example(self.tokenizer, p, r, self.max_length, self.encoder,
                                           truncation or self.truncation))
            except ValueError as err:
                raise UserError(f"example {i}: {err} (this reward model reads at most {self.max_length} tokens)") from None
        examples = [(s,) for s in seqs]
        with autocast(self.precision, next(self.model.parameters()).device, "reward.train.precision"):
            return score_examples(self.model, examples, "pointwise", self.tokenizer.pad_token_id, batch_size)

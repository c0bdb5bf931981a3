"""Sampling from the anchor or the policy: batched, left-padded, KV cache on, one `generate` call per batch;
with fp32 weights outside autocast a LoRA policy's adapter is folded into copies of the weights while it
samples (:func:`merged_adapters`).

The RL loop and evaluation both sample through :func:`sample_responses`, so the response a
policy is trained on and the response it is evaluated on are produced the same way.
:class:`PolicyGenerator` loads an anchor or policy folder and turns prompts into text.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from perl_core.artifacts import read_manifest
from perl_core.config import GenerationConfig
from perl_core.devices import autocast, run_device
from perl_core.errors import UserError
from perl_core.modeling import (encode_prompt, fit_embeddings, load_causal_lm, load_tokenizer, pad_rows,
                                response_end_id)


@dataclass
class Samples:
    """`sequences` = left-padded prompt (width `prompt_width`) followed by the sampled response tokens.

    EOS here is the token that ends a response (`modeling.response_end_id`: eos, or the chat
    template's end-of-turn). `temperature` is the T of the distribution pi_T = softmax(logits / T)
    the tokens were drawn from; log-probs of these samples are taken under it (`rl.token_logprobs`).
    """

    sequences: torch.Tensor        # [N, P + T]
    attention_mask: torch.Tensor   # [N, P + T]; 0 on left padding and after the first EOS
    response_mask: torch.Tensor    # [N, T]; 1 on response tokens up to and including the first EOS
    prompt_width: int
    finished: torch.Tensor         # [N] bool: the response ended with EOS (not cut by max_new_tokens)
    temperature: float = 1.0       # greedy samples carry 1.0: their log-probs are the untempered model's
    # [N, T]: the sampler's log-prob of each sampled token under the distribution it drew from (T, top_p), 0 off
    # the response mask; what RL's log-prob guard compares with the learner's (`rl.logprob_gap`)
    logprobs: Optional[torch.Tensor] = None

    @property
    def responses(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_width:]

    def to(self, device: torch.device) -> "Samples":
        return replace(self, sequences=self.sequences.to(device), attention_mask=self.attention_mask.to(device),
                       response_mask=self.response_mask.to(device), finished=self.finished.to(device),
                       logprobs=None if self.logprobs is None else self.logprobs.to(device))


@contextlib.contextmanager
def merged_adapters(model):
    """For sampling: each active LoRA adapter folded into a COPY of the weight it adapts, adapters off.

    Decoding runs the model once per new token; unmerged, every adapted projection adds two small
    matmuls to each of those forwards. Merged into copies, the forward is the plain model's. The
    original weight tensors are put back untouched afterwards (never merged and unmerged in place,
    which would round them), so with adapters off the model is still exactly the anchor. Costs one
    copy of the adapted weights while sampling. Only fp32 weights outside autocast are folded: in a
    16-bit matmul W + dW would round small updates away, which the unmerged adapter (its own matmuls)
    keeps, so the samples would come from another policy than the one trained. Anything but plain
    LoRA on linear layers (DoRA and other variants, LoRA biases, other layer types), or no PEFT model
    at all, samples as it is, and so does a model whose adapters are off (`disable_adapter`: the anchor)."""
    from peft.tuners.lora import Linear as LoraLinear, LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)] if hasattr(model, "disable_adapter") else []
    active = [(m, [a for a in m.active_adapters if a in m.lora_A]) for m in layers if not m.disable_adapters]
    active = [(m, names) for m, names in active if names and not getattr(m, "merged", False)]
    plain = all(isinstance(m, LoraLinear) and m.get_base_layer().weight.dtype == torch.float32
                and not any(m.use_dora.get(a, False) or a in getattr(m, "lora_variant", {})
                            or getattr(m, "lora_bias", {}).get(a, False) for a in names)
                for m, names in active)
    device_type = next(model.parameters()).device.type
    if not active or not plain or torch.is_autocast_enabled(device_type):
        yield
        return
    originals = []
    try:
        with torch.no_grad():
            for layer, names in active:
                base = layer.get_base_layer()
                merged = base.weight.detach().clone()
                for name in names:
                    merged += layer.get_delta_weight(name).to(merged.dtype)
                originals.append((base, base.weight))
                base.weight = torch.nn.Parameter(merged, requires_grad=False)
        with model.disable_adapter():
            yield
    finally:
        for base, weight in originals:
            base.weight = weight


@torch.no_grad()
def sample_responses(model, tokenizer, prompt_ids: list[list[int]], *, max_new_tokens: int,
                     temperature: float = 1.0, top_p: float = 1.0) -> Samples:
    """Sample one response per row of `prompt_ids` (repeat rows for k samples). `temperature=0` is greedy."""
    from transformers import GenerationConfig as HFGenerationConfig  # not perl_core.config's

    if max_new_tokens < 1:  # the one check for callers outside a config (the CLI, a served model's params)
        raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    eos, pad = response_end_id(tokenizer), tokenizer.pad_token_id
    ids, mask = pad_rows(prompt_ids, pad, side="left")
    device = next(model.parameters()).device
    greedy = temperature == 0
    gen_cfg = HFGenerationConfig(
        do_sample=not greedy, temperature=None if greedy else temperature, top_p=None if greedy else top_p,
        top_k=0,  # transformers otherwise applies top_k=50 silently
        max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos, use_cache=True,
        output_scores=True, return_dict_in_generate=True,  # the processed scores: the sampled tokens' log-probs
    )
    was_training = model.training
    model.eval()  # no dropout, and gradient-checkpointed layers keep the KV cache (they drop it in training mode)
    with merged_adapters(model):
        generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen_cfg)
    model.train(was_training)
    out = generated.sequences.cpu()
    width = ids.shape[1]
    response = out[:, width:]
    if response.shape[1] == 0:
        raise UserError("generate returned no new tokens")
    # scores[t] = the logits of step t after temperature and top-p (-inf outside the nucleus), in float32
    logprobs = torch.stack([F.log_softmax(score.float(), dim=-1).gather(-1, response[:, t:t + 1].to(score.device))
                            .squeeze(-1).cpu() for t, score in enumerate(generated.scores)], dim=1)
    is_eos = response == eos
    # keep tokens up to and including the first EOS; everything after it is padding
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    response_mask = (~after_eos).long()
    finished = is_eos.any(-1)
    sequences = torch.cat([ids, response.masked_fill(after_eos, pad)], dim=1)
    attention_mask = torch.cat([mask, response_mask], dim=1)
    return Samples(sequences, attention_mask, response_mask, width, finished, 1.0 if greedy else float(temperature),
                   logprobs=logprobs.masked_fill(after_eos, 0.0))


class HFSampler:
    """RL's sampler in the trainer's process: `sample_responses` on the policy itself, so every step
    samples from the weights being trained (`sync` has nothing to send; the version is the step)."""

    engine = "hf"

    def __init__(self, policy, tokenizer, gen: GenerationConfig):
        self.policy, self.tokenizer, self.gen, self.version = policy, tokenizer, gen, 0

    def sync(self, step: int) -> None:
        self.version = step

    def sample(self, prompt_ids: list[list[int]]) -> Samples:
        return sample_responses(self.policy, self.tokenizer, prompt_ids, max_new_tokens=self.gen.max_new_tokens,
                                temperature=self.gen.temperature, top_p=self.gen.top_p)

    def __enter__(self) -> "HFSampler":
        return self

    def __exit__(self, *exc) -> None:
        return None


def decode_responses(tokenizer, samples: Samples) -> list[str]:
    texts, end = [], response_end_id(tokenizer)
    for row, m in zip(samples.responses, samples.response_mask):
        ids = [int(t) for t, keep in zip(row, m) if keep and int(t) != end]
        texts.append(tokenizer.decode(ids, skip_special_tokens=True))
    return texts


def generation_defaults(manifest: dict) -> dict:
    """How a folder samples when a caller says nothing: a policy as it was trained and evaluated
    (the `policy.generation` its manifest recorded), an anchor at `GenerationConfig`'s defaults.
    `perl-rlhf policy generate`, the registered model's signature and `predict` all read this."""
    recorded = (manifest.get("config") or {}).get("generation") or {}
    gen = GenerationConfig.model_validate(recorded)
    return {"max_new_tokens": gen.max_new_tokens, "temperature": gen.temperature, "top_p": gen.top_p}


class PolicyGenerator:
    """Text in, text out for an anchor folder or a policy folder (LoRA adapters are merged for speed)."""

    def __init__(self, model, tokenizer, manifest: dict, path: Path, precision: str = "auto"):
        self.model, self.tokenizer, self.manifest, self.path = model, tokenizer, manifest, path
        self.precision = precision
        self.defaults = generation_defaults(manifest)

    @classmethod
    def load(cls, path: str | Path, dtype: str = "float32", precision: str = "auto") -> "PolicyGenerator":
        """The folder's model on :func:`perl_core.devices.run_device`, sampling under `precision`
        (auto | fp32 | bf16 | fp16, as `policy.train.precision`)."""
        path = Path(path)
        manifest = read_manifest(path)
        kind = manifest.get("kind")
        if kind not in ("anchor", "policy"):
            raise UserError(f"{path}: expected an anchor or policy artifact, found kind={kind!r}")
        tokenizer = load_tokenizer(str(path), padding_side="left")
        if kind == "policy" and manifest.get("tuning") == "lora":
            from peft import PeftModel

            anchor = Path(manifest["anchor"])
            if not (anchor / "config.json").exists():
                raise UserError(f"{path}/manifest.json: the policy adapter's anchor {anchor} is missing; "
                                "copy the anchor folder there or retrain the policy")
            base = fit_embeddings(load_causal_lm(str(anchor), dtype), tokenizer)
            model = PeftModel.from_pretrained(base, str(path)).merge_and_unload()
        else:
            model = fit_embeddings(load_causal_lm(str(path), dtype), tokenizer)
        model.to(run_device()).eval()
        return cls(model, tokenizer, manifest, path, precision)

    def autocast(self):
        """The context this generator's forwards run under (its precision on its model's device)."""
        return autocast(self.precision, next(self.model.parameters()).device, "policy.train.precision")

    def generate(self, prompts: list[str], seed: int = 0, max_new_tokens: Optional[int] = None,
                 temperature: Optional[float] = None, top_p: Optional[float] = None, batch_size: int = 32) -> list[str]:
        """Responses to `prompts`, seeded (same seed, same text). `temperature=0` decodes greedily."""
        opts = dict(self.defaults)
        opts.update({k: v for k, v in dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p).items()
                     if v is not None})
        torch.manual_seed(seed)
        texts: list[str] = []
        for start in range(0, len(prompts), batch_size):
            chunk = [encode_prompt(self.tokenizer, p) for p in prompts[start:start + batch_size]]
            with self.autocast():
                samples = sample_responses(self.model, self.tokenizer, chunk, **opts)
            texts += decode_responses(self.tokenizer, samples)
        return texts

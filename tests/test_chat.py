"""Chat templates: our transcripts become messages, prompts are rendered with add_generation_prompt,
the response is the assistant turn ended by the template's end-of-turn, `data.chat_template=off`
turns it off, and TRL's conversational rows are accepted."""
import math

import pytest
import torch

from chat_backbones import build_chat_backbone, build_tokenizer
from perl_core.errors import DataError
from perl_core.modeling import encode_pair, encode_prompt, load_tokenizer, prompts_within, prompt_messages, response_end_id

HH = "Human: I want a coffee.\n\nAssistant: Hot or iced?\n\nHuman: Iced, please.\n\nAssistant:"
HH_MESSAGES = [{"role": "user", "content": "I want a coffee."}, {"role": "assistant", "content": "Hot or iced?"},
               {"role": "user", "content": "Iced, please."}]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    return {style: load_tokenizer(build_chat_backbone(root / style, style)) for style in ("smollm2", "qwen2.5")}


def test_transcripts_become_messages():
    assert prompt_messages(HH) == HH_MESSAGES
    assert prompt_messages("\n\n" + HH) == HH_MESSAGES  # as HH-RLHF ships it, before normalisation
    taskmaster = ('User: Can I get a decaf cortado?\nAgent: CALL get_menu_items {"query": "Cortado "}\n'
                  'API: get_menu_items -> {"items": [\n"cortado"]}\nAgent: Got it.\nUser: Thanks\nUser: and a scone\nAgent:')
    assert prompt_messages(taskmaster) == [
        {"role": "user", "content": "Can I get a decaf cortado?"},
        {"role": "assistant", "content": 'CALL get_menu_items {"query": "Cortado "}'},
        {"role": "user", "content": 'API: get_menu_items -> {"items": [\n"cortado"]}'},  # a verbatim payload's newline
        {"role": "assistant", "content": "Got it."},
        {"role": "user", "content": "Thanks\nand a scone"}]  # one role's consecutive turns are joined
    assert prompt_messages("Customer: a large latte please\nAgent:") == [{"role": "user", "content": "a large latte please"}]
    # a Taskmaster dialog's first agent turn has no context: an empty user turn, which every template renders
    assert prompt_messages("Agent:") == [{"role": "user", "content": ""}]
    assert prompt_messages("  Summarise this: Agent: is a word.  ") == [
        {"role": "user", "content": "Summarise this: Agent: is a word."}]


def test_the_data_sources_transcripts_read_back_as_their_turns():
    from perl_core.data.hh_rlhf import split_transcripts
    from perl_core.data.taskmaster4 import render_prompt

    row = split_transcripts({"chosen": "\n\n" + HH + " One iced coffee.", "rejected": "\n\n" + HH + " No."}, "f", 1)
    assert prompt_messages(row["prompt"]) == HH_MESSAGES
    turns = [{"role": "user", "text": "A latte"}, {"role": "agent", "api": {"get_menu_items": '{"query": "latte"}'}},
             {"role": "api", "response": {"get_menu_items": {"items": []}}}]
    assert prompt_messages(render_prompt(turns)) == [
        {"role": "user", "content": "A latte"},
        {"role": "assistant", "content": 'CALL get_menu_items {"query": "latte"}'},
        {"role": "user", "content": 'API: get_menu_items -> {"items": []}'}]


def test_a_multi_turn_prompt_renders_to_the_exact_chatml_ids(tokenizers):
    tok = tokenizers["smollm2"]
    start, end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")

    def text(s):
        return tok(s, add_special_tokens=False)["input_ids"]

    expected = ([start] + text("user\nI want a coffee.") + [end] + text("\n")
                + [start] + text("assistant\nHot or iced?") + [end] + text("\n")
                + [start] + text("user\nIced, please.") + [end] + text("\n")
                + [start] + text("assistant\n"))
    ids = encode_prompt(tok, HH)
    assert ids == expected
    assert tok.decode(ids) == ("<|im_start|>user\nI want a coffee.<|im_end|>\n<|im_start|>assistant\nHot or iced?"
                               "<|im_end|>\n<|im_start|>user\nIced, please.<|im_end|>\n<|im_start|>assistant\n")
    # the response is the assistant turn (its leading space is the text format's, not content), then end-of-turn
    pair, boundary = encode_pair(tok, HH, " One iced coffee.", max_length=256)
    assert boundary == len(expected) and pair == expected + text("One iced coffee.") + [end]
    assert prompts_within(tok, [HH], len(expected)) == [(HH, expected)]
    assert prompts_within(tok, [HH], len(expected) - 1) == []


def test_an_opening_agent_turn_renders_after_an_empty_user_turn(tokenizers):
    tok = tokenizers["smollm2"]
    assert tok.decode(encode_prompt(tok, "Agent:")) == "<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n"


def test_the_response_ends_with_the_templates_end_of_turn_not_eos(tokenizers):
    smol, qwen = tokenizers["smollm2"], tokenizers["qwen2.5"]
    assert response_end_id(smol) == smol.eos_token_id == smol.convert_tokens_to_ids("<|im_end|>")
    assert qwen.eos_token == "<|endoftext|>" and response_end_id(qwen) == qwen.convert_tokens_to_ids("<|im_end|>")
    assert encode_pair(qwen, "a latte", "Sure", 64)[0][-1] == response_end_id(qwen)


def test_chat_template_off_reads_plain_text(tmp_path):
    path = build_chat_backbone(tmp_path / "m", "qwen2.5")
    tok = load_tokenizer(path, chat_template="off")
    assert tok.chat_template is None and response_end_id(tok) == tok.eos_token_id
    assert encode_prompt(tok, HH) == tok(HH, add_special_tokens=False)["input_ids"]  # no bos in this vocabulary
    with pytest.raises(Exception, match="auto or off"):
        load_tokenizer(path, chat_template="on")


def test_generation_stops_on_the_end_of_turn_and_decoding_drops_it(tokenizers):
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    from perl_core.policy.generation import decode_responses, sample_responses

    tok = tokenizers["qwen2.5"]
    end, pad = response_end_id(tok), tok.pad_token_id
    words = tok("Sure, one latte", add_special_tokens=False)["input_ids"]

    class Scripted(torch.nn.Module):
        """`generate` writes a fixed continuation; checks it was told to stop on the end-of-turn."""

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def generate(self, input_ids, attention_mask, generation_config):
            assert generation_config.eos_token_id == end and generation_config.pad_token_id == pad
            n = generation_config.max_new_tokens
            # finished rows are padded after their end token; an unfinished one runs to max_new_tokens
            rows = [words + [end] + [pad] * (n - len(words) - 1), words[:1] + [end] + [pad] * (n - 2), words * 2]
            sequences = torch.cat([input_ids, torch.tensor([r[:n] for r in rows])], 1)
            # uniform processed scores over the vocabulary: each sampled token's log-prob is -log V
            return GenerateDecoderOnlyOutput(sequences=sequences, scores=tuple(torch.zeros(3, len(tok)) for _ in range(n)))

    n = 2 * len(words)
    samples = sample_responses(Scripted(), tok, [encode_prompt(tok, HH)] * 3, max_new_tokens=n, temperature=0.7)
    assert samples.finished.tolist() == [True, True, False] and samples.temperature == 0.7
    assert samples.response_mask.sum(-1).tolist() == [len(words) + 1, 2, n]
    assert decode_responses(tok, samples) == ["Sure, one latte", tok.decode(words[:1]), tok.decode(words * 2)]
    expected = -math.log(len(tok)) * samples.response_mask.float()  # 0 after the end token
    assert torch.allclose(samples.logprobs, expected)


# ---------------------------------------------------------------- TRL's conversational rows
def _validate(view, row):
    from perl_core.data.schema import Record, validate

    return validate(Record(view=view, row=row, file="rows.jsonl", index=3))


def test_conversational_rows_become_transcripts_that_render_back_to_their_messages():
    system = [{"role": "system", "content": "You take coffee orders."}]
    row = _validate("pairwise", {"prompt": system + HH_MESSAGES,
                                 "chosen": [{"role": "assistant", "content": "One iced coffee."}],
                                 "rejected": [{"role": "assistant", "content": " No. "}], "id": "c1"})
    assert row == {"prompt": "System: You take coffee orders.\n\n" + HH, "chosen": " One iced coffee.",
                   "rejected": " No.", "id": "c1"}
    assert prompt_messages(row["prompt"]) == system + HH_MESSAGES
    sft = _validate("sft", {"prompt": [{"role": "user", "content": "A latte"}],
                            "response": [{"role": "assistant", "content": "Sure."}]})
    assert sft == {"prompt": "Human: A latte\n\nAssistant:", "response": " Sure."}


@pytest.mark.parametrize("field, value, message", [
    ("prompt", HH_MESSAGES + [{"role": "assistant", "content": "Hm"}], "last message is the assistant's"),
    ("prompt", [{"role": "tool", "content": "{}"}], r"message 0 must be \{role, content\} with role one of"),
    ("prompt", [], "an empty message list"),
    ("chosen", [{"role": "user", "content": "x"}], r"expected one assistant message, got roles \['user'\]"),
])
def test_bad_conversational_rows_name_the_field(field, value, message):
    row = {"prompt": HH_MESSAGES, "chosen": [{"role": "assistant", "content": "Yes"}],
           "rejected": [{"role": "assistant", "content": "No"}]}
    row[field] = value
    with pytest.raises(DataError, match=rf"rows.jsonl, row 3, field '{field}': .*{message}"):
        _validate("pairwise", row)


def test_a_tokenizer_that_ships_pad_as_eos_keeps_it_and_one_without_pad_gets_a_named_pad(tmp_path):
    assert load_tokenizer(build_chat_backbone(tmp_path / "s", "smollm2")).pad_token == "<|im_end|>"
    build_tokenizer(tmp_path / "llama31", "<|endoftext|>", pad=None, extra_specials=("<|finetune_right_pad_id|>",))
    tok = load_tokenizer(str(tmp_path / "llama31"))
    assert tok.pad_token == "<|finetune_right_pad_id|>" and "<pad>" not in tok.get_vocab()


@pytest.mark.parametrize("setting", ["auto", "off"])
def test_sft_and_the_reward_model_follow_data_chat_template(tmp_path, monkeypatch, setting):
    """SFT learns the template's end-of-turn, the saved anchor and reward model carry the template
    (auto) or not (off), and RL's one-backbone roles read them the same way."""
    import perl_core.data
    from perl_core.config import build_config
    from perl_core.policy.roles import OneBackbone, build_roles
    from perl_core.reward.train import RewardScorer, train_reward_model
    from perl_core.sft import train_anchor

    sft = [{"prompt": HH, "response": " One iced coffee."}, {"prompt": "Customer: a latte\nAgent:", "response": " Sure."}]
    pairs = [{"prompt": r["prompt"], "chosen": r["response"], "rejected": " No."} for r in sft]
    views = {"sft": sft, "pairwise": pairs}
    monkeypatch.setattr(perl_core.data, "load_rows", lambda cfg, view, split: views[view], raising=False)
    monkeypatch.setattr("perl_core.data.versioning.recorded_version", lambda: {"md5": "test"})
    backbone = build_chat_backbone(tmp_path / "backbone", "qwen2.5")
    # data_dir under tmp: the stand-in rows only, whatever a prepared data/ holds in the working folder
    cfg = build_config({"artifacts_dir": str(tmp_path / "artifacts"),
                        "data": {"chat_template": setting, "data_dir": str(tmp_path / "data")},
                        "sft": {"backbone": {"name": backbone}, "train": {"batch_size": 2, "max_steps": 1}},
                        "reward": {"train": {"batch_size": 2, "max_steps": 1, "eval_every": 1}},
                        "policy": {"max_prompt_length": 60}})
    anchor = train_anchor(cfg, tmp_path / "anchor").out_dir
    tok = load_tokenizer(str(anchor))
    assert (tok.chat_template is not None) == (setting == "auto")
    end = tok.convert_tokens_to_ids("<|im_end|>") if setting == "auto" else tok.eos_token_id
    assert response_end_id(tok) == end and encode_pair(tok, HH, " One iced coffee.", 128)[0][-1] == end
    rm = train_reward_model(cfg, tmp_path / "rm", base_model=anchor).out_dir
    assert RewardScorer.load(rm).tokenizer.chat_template == tok.chat_template
    roles = build_roles(cfg.policy, anchor, rm, sample_texts=[HH])
    assert isinstance(roles, OneBackbone) and encode_prompt(roles.tokenizer, HH) == encode_prompt(tok, HH)

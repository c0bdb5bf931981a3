"""The one way a reward model reads text, on tiny Llama- and Qwen2-shaped models whose tokenizers
look like the real ones (pad == eos, or no pad at all; a ChatML chat template): the one-backbone RL
reward equals the reward model's own scorer, and padding on either side never changes a score."""
from pathlib import Path

import pytest
import torch

from chat_backbones import STYLES, build_chat_backbone
from stand_ins import samples_from_text, stand_in_reward_model
from perl_core.artifacts import write_manifest
from perl_core.config import build_config
from perl_core.modeling import encode_pair, encode_prompt, load_tokenizer, pad_rows
from perl_core.policy.roles import OneBackbone, build_roles
from perl_core.reward.train import RewardScorer

PROMPTS = [
    "Human: I want a coffee.\n\nAssistant: Hot or iced?\n\nHuman: Iced, please.\n\nAssistant:",
    'User: a large latte please\nAgent: CALL get_menu_items {"query": "latte"}\nAPI: get_menu_items -> {"items": []}\nAgent:',
    "Customer: a small mocha with oat milk please\nAgent:",
    "a medium flat white with soy milk",
    "Customer: a large latte with soy milk please, thanks\nAgent:",
    "Human: a small flat white please\n\nAssistant:",
]
RESPONSES = ["Sure, one iced coffee coming up.", "a large latte", "Hot or iced?", "one flat white with oat milk",
             "Sure", "soy milk please"]


@pytest.fixture(scope="module", params=sorted(STYLES))
def chat_dirs(request, tmp_path_factory):
    """An anchor in `request.param`'s style and a stand-in LoRA reward model on it, in the reward stage's format."""
    root = tmp_path_factory.mktemp(request.param)
    anchor = Path(build_chat_backbone(root / "anchor", request.param))
    write_manifest(anchor, kind="anchor", base_model=str(anchor), tuning="none", config={})
    return request.param, anchor, stand_in_reward_model(anchor, root / "rm", fit_vocab=True)


def roles_for(anchor, rm):
    cfg = build_config({"policy": {"lora": {"rank": 4}, "max_prompt_length": 100}}).policy
    return build_roles(cfg, anchor, rm, sample_texts=PROMPTS)


def test_one_backbone_reward_equals_the_reward_models_scorer(chat_dirs):
    style, anchor, rm = chat_dirs
    roles = roles_for(anchor, rm)
    assert isinstance(roles, OneBackbone)
    tok = roles.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")  # the template's end-of-turn (== eos only for smollm2)
    samples = samples_from_text(tok, PROMPTS, RESPONSES, end, cut={2})
    got = roles.reward(samples, PROMPTS, RESPONSES)
    # independent path: the reward model's folder loaded on its own (merged, right padding, text in)
    expected = RewardScorer.load(rm).score(PROMPTS, RESPONSES)
    assert expected.std() > 0.1  # the stand-in RM tells these apart
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_an_empty_response_is_prompt_plus_end_token_on_every_path(chat_dirs):
    from perl_core.eval.policy import rm_scores
    from perl_core.modeling import response_end_id
    from perl_core.scoring import sequence_scores

    style, anchor, rm = chat_dirs
    roles = roles_for(anchor, rm)
    scorer = RewardScorer.load(rm)
    end = response_end_id(roles.tokenizer)
    samples = samples_from_text(roles.tokenizer, PROMPTS[:3], ["", "Sure", ""], end)
    one_backbone = roles.reward(samples, PROMPTS[:3], ["", "Sure", ""])
    by_text = scorer.score(PROMPTS[:3], ["", "Sure", ""])
    evaluation = torch.from_numpy(rm_scores(scorer, PROMPTS[:3], ["", "Sure", ""])).float()
    ids = encode_prompt(scorer.tokenizer, PROMPTS[0]) + [end]
    with torch.no_grad():
        by_hand = sequence_scores(scorer.model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
    for scores in (one_backbone, by_text, evaluation):
        torch.testing.assert_close(scores[0], by_hand[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(scores, by_text, atol=1e-4, rtol=1e-4)


def test_left_and_right_padding_read_the_end_token_of_an_unpadded_forward(chat_dirs):
    from perl_core.modeling import response_end_id
    from perl_core.scoring import sequence_scores

    style, anchor, rm = chat_dirs
    scorer = RewardScorer.load(rm)
    model, tok = scorer.model, scorer.tokenizer
    seqs = [encode_pair(tok, p, r, 256)[0] for p, r in zip(PROMPTS, RESPONSES)]
    assert len({len(s) for s in seqs}) > 1 and all(s[-1] == response_end_id(tok) for s in seqs)
    right = pad_rows(seqs, tok.pad_token_id, side="right")
    left = pad_rows(seqs, tok.pad_token_id, side="left")
    with torch.no_grad():
        by_right, by_left = sequence_scores(model, *right), sequence_scores(model, *left)
        # independent path: each sequence alone, no padding, the head on the final hidden state
        alone = torch.stack([model.score(model.model(input_ids=torch.tensor([s])).last_hidden_state[0, -1])[0]
                             for s in seqs])
        pooled = model(input_ids=right[0], attention_mask=right[1]).logits[:, 0]
    torch.testing.assert_close(by_right, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(by_left, alone, atol=1e-5, rtol=1e-5)
    assert alone.std() > 0.1
    if tok.pad_token_id == response_end_id(tok):
        # transformers' own rule (last token that is not pad) reads the response's last token here instead
        assert (pooled - alone).abs().max() > 1e-3


def test_last_attended_on_hand_masks():
    from perl_core.scoring import last_attended, position_ids

    masks = torch.tensor([[0, 0, 1, 1, 1, 0, 0],    # left padding, then zeros after an early EOS
                          [1, 1, 1, 1, 1, 1, 1],
                          [1, 1, 0, 0, 0, 0, 0],    # right padding
                          [0, 0, 0, 0, 0, 0, 1]])
    assert last_attended(masks).tolist() == [4, 6, 1, 6]
    assert position_ids(masks)[0].tolist() == [0, 0, 0, 1, 2, 0, 0]


def test_a_tokenizer_without_pad_gets_a_distinct_one_and_the_model_a_row_for_it(tmp_path):
    from perl_core.modeling import fit_embeddings, load_causal_lm

    path = build_chat_backbone(tmp_path / "m", "nopad")
    tok = load_tokenizer(path)
    model = load_causal_lm(path)
    before = model.get_input_embeddings().weight.detach().clone()
    assert tok.pad_token == "<pad>" and tok.pad_token_id == before.shape[0] != tok.eos_token_id
    fit_embeddings(model, tok)
    after = model.get_input_embeddings().weight
    assert after.shape[0] == len(tok) == before.shape[0] + 1 and torch.equal(after[:-1], before)


def test_the_one_backbone_reward_ignores_lora_dropout_while_the_policy_trains(tmp_path):
    from perl_core.config import LoraConfig

    anchor = Path(build_chat_backbone(tmp_path / "anchor", "smollm2"))
    write_manifest(anchor, kind="anchor", base_model=str(anchor), tuning="none", config={})
    rm = stand_in_reward_model(anchor, tmp_path / "rm", LoraConfig(rank=4, dropout=0.5), fit_vocab=True)
    roles = roles_for(anchor, rm)
    assert isinstance(roles, OneBackbone)  # the reward adapter sits on the policy's backbone
    roles.policy.train()  # as in the RL loop
    tok = roles.tokenizer
    samples = samples_from_text(tok, PROMPTS, RESPONSES, tok.convert_tokens_to_ids("<|im_end|>"))
    first, second = roles.reward(samples, PROMPTS, RESPONSES), roles.reward(samples, PROMPTS, RESPONSES)
    assert torch.equal(first, second)  # dropout 0.5 would make two calls differ
    assert roles.policy.training
    torch.testing.assert_close(first, RewardScorer.load(rm).score(PROMPTS, RESPONSES), atol=1e-4, rtol=1e-4)

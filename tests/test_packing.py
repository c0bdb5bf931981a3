"""Shared-prefix packing: the layout by hand, and packed scores and gradients equal to the unpacked
path (each sequence padded and scored on its own) on tiny Llama- and Qwen2-shaped reward models."""
import pytest
import torch
from transformers import (BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForSequenceClassification,
                          Qwen2Config, Qwen2ForSequenceClassification)

from perl_core.config import LoraConfig
from perl_core.modeling import attach_lora, pad_rows
from perl_core.packing import can_pack, common_prefix, pack, pack_shared
from perl_core.scoring import pair_scores, sequence_scores

# shared prompts of several lengths, no shared token, identical sequences, one a prefix of the other
PAIRS = [([5, 6, 7, 8, 9], [5, 6, 7, 3]), ([1, 2], [3, 4, 5, 6, 7, 8]), ([4, 4, 4], [4, 4, 4]),
         ([9, 8], [9, 8, 7, 6]), ([11, 12, 13, 14, 15, 16, 17], [11, 12, 13, 14, 15, 16, 18])]


def test_common_prefix_leaves_each_sequence_a_token_of_its_own():
    assert common_prefix([[1, 2, 3], [1, 2, 4]]) == 2
    assert common_prefix([[1, 2, 3], [1, 2, 3]]) == 2
    assert common_prefix([[1, 2], [1, 2, 3, 4]]) == 1
    assert common_prefix([[1], [2]]) == 0
    assert common_prefix([[7, 1, 2], [7, 1, 3], [7, 2]]) == 1


def test_pack_layout_by_hand():
    p = pack_shared([([5, 6, 7], [5, 6, 8, 9]), ([1], [2])], pad_id=0)
    assert p.input_ids.tolist() == [[5, 6, 7, 8, 9], [1, 2, 0, 0, 0]]
    assert p.position_ids.tolist() == [[0, 1, 2, 2, 3], [0, 0, 0, 0, 0]]
    assert p.rows.tolist() == [0, 0, 1, 1] and p.prefix_ends.tolist() == [1, 1, -1, -1] and p.starts.tolist() == [2, 3, 0, 1] and p.ends.tolist() == [2, 4, 0, 1]
    t, f = True, False
    assert p.attention_mask[0, 0].tolist() == [
        [t, f, f, f, f],   # prefix
        [t, t, f, f, f],
        [t, t, t, f, f],   # continuation 1 (7)
        [t, t, f, t, f],   # continuation 2 (8) sees the prefix, not 7
        [t, t, f, t, t]]   # continuation 2 (9)
    assert p.attention_mask[1, 0].tolist() == [
        [t, f, f, f, f],   # sequence 1 alone
        [f, t, f, f, f],   # sequence 2 alone (no shared token)
        [f, f, t, f, f],   # pads see themselves only
        [f, f, f, t, f],
        [f, f, f, f, t]]


def _llama(impl):
    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, num_labels=1, pad_token_id=0)
    cfg._attn_implementation = impl
    return LlamaForSequenceClassification(cfg)


def _qwen2(impl):
    cfg = Qwen2Config(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, num_labels=1, pad_token_id=0)
    cfg._attn_implementation = impl
    return Qwen2ForSequenceClassification(cfg)


def _unpacked(model, pairs, pad_id=0):
    n = len(pairs)
    scores = sequence_scores(model, *pad_rows([c for c, _ in pairs] + [r for _, r in pairs], 0, side="right"))
    return scores[:n], scores[n:]


@pytest.mark.parametrize("build", [_llama, _qwen2], ids=["llama", "qwen2"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_pair_scores_and_lora_gradients_equal_the_unpacked_path(build, impl):
    torch.manual_seed(0)
    model = attach_lora(build(impl), LoraConfig(rank=4), "SEQ_CLS", modules_to_save=["score"])
    with torch.no_grad():  # a LoRA B of zeros would leave the adapter's gradient path untested
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    assert can_pack(model.get_base_model())
    grads = []
    for scores in (pair_scores, _unpacked):
        model.zero_grad()
        chosen, rejected = scores(model, PAIRS, 0)
        torch.nn.functional.logsigmoid(chosen - rejected).mean().neg().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        if scores is pair_scores:
            packed = (chosen.detach(), rejected.detach())
    ref = _unpacked(model, PAIRS)
    torch.testing.assert_close(packed[0], ref[0].detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[1], ref[1].detach(), atol=1e-5, rtol=1e-5)
    assert (packed[0] - packed[1]).abs().max() > 1e-3  # the pairs' scores differ: the check can fail
    assert set(grads[0]) == set(grads[1]) and any("lora_A" in n for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4)


def test_packing_saves_the_shared_prompt_tokens():
    prompt = list(range(10, 40))
    pairs = [(prompt + [1, 2], prompt + [3, 4, 5])] * 4
    assert pack_shared(pairs, 0).input_ids.numel() == 4 * (30 + 2 + 3)  # against 8 rows of 33 unpacked


def test_an_encoder_is_never_packed():
    cfg = BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                     num_labels=1)
    model = BertForSequenceClassification(cfg).eval()
    assert not can_pack(model)
    torch.testing.assert_close(pair_scores(model, PAIRS, 0)[0], model(*pad_rows([c for c, _ in PAIRS], 0)).logits[:, 0])


def _left_padded_samples(prompts, responses, eos, pad=0, temperature=0.7):
    """Samples as `sample_responses` lays them out: left-padded prompts, responses up to the first eos."""
    from perl_core.policy.generation import Samples

    ids, mask = pad_rows(prompts, pad, side="left")
    width = max(len(r) for r in responses)
    resp = torch.full((len(responses), width), pad)
    rmask = torch.zeros((len(responses), width), dtype=torch.long)
    for i, r in enumerate(responses):
        resp[i, :len(r)] = torch.tensor(r)
        rmask[i, :len(r)] = 1
    finished = torch.tensor([r[-1] == eos for r in responses])
    return Samples(torch.cat([ids, resp], 1), torch.cat([mask, rmask], 1), rmask, ids.shape[1], finished, temperature)


@pytest.mark.parametrize("rows_per_prompt", ["one", "split"])
def test_packed_token_logprobs_equal_the_left_padded_forward(monkeypatch, rows_per_prompt):
    from transformers import LlamaForCausalLM

    from perl_core.policy import rl
    from perl_core.policy.rl import sample_groups, token_logprobs

    rows = []

    def recording_pack(groups, pad_id, hidden_size):
        # "split": a cost model that is all attention (a near-zero width): rows by the sum of L^2. The 5-token
        # prompt with responses of 1 and 4 tokens stays one row (10^2 < 6^2 + 9^2), the other prompts split
        packed = pack(groups, pad_id, hidden_size=1e-3 if rows_per_prompt == "split" else hidden_size)
        rows.append(packed.input_ids.shape[0])
        return packed

    monkeypatch.setattr(rl, "pack", recording_pack)
    from perl_core.scoring import position_ids

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, pad_token_id=0)
    model = attach_lora(LlamaForCausalLM(cfg), LoraConfig(rank=4), "CAUSAL_LM")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    eos = 2
    # k = 2 samples for each of 3 prompts: ended by eos at several lengths, or cut (no eos)
    prompts = [[5, 6, 7]] * 2 + [[9, 10, 11, 12, 13]] * 2 + [[14]] * 2
    responses = [[20, 21, eos], [22, 23, 24, 25], [eos], [26, 27, 28, eos], [29, 30], [31, 32, 33, 34]]
    samples = _left_padded_samples(prompts, responses, eos)
    assert [len(rs) for _, rs in sample_groups(samples)] == [2, 2, 2]  # packed: one row per prompt
    logp, entropy, hidden = token_logprobs(model, samples, with_hidden=True)
    logp.sum().backward()
    got_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    # independent path: the left-padded batch in one forward, as `generate` saw it
    out = model(input_ids=samples.sequences, attention_mask=samples.attention_mask,
                position_ids=position_ids(samples.attention_mask), output_hidden_states=True)
    p = samples.prompt_width
    all_logp = torch.log_softmax(out.logits[:, p - 1:-1] / samples.temperature, -1)
    ref = all_logp.gather(-1, samples.responses.unsqueeze(-1)).squeeze(-1) * samples.response_mask
    ref.sum().backward()
    torch.testing.assert_close(logp, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hidden, out.hidden_states[-1][:, p - 1], atol=1e-5, rtol=1e-5)
    ref_entropy = -(all_logp.exp() * all_logp).sum(-1) * samples.response_mask
    torch.testing.assert_close(entropy, ref_entropy.detach(), atol=1e-5, rtol=1e-5)
    assert (logp != 0).sum() == sum(len(r) for r in responses)
    assert rows == [5 if rows_per_prompt == "split" else 3]  # the packed path ran, with the rows intended
    for name, grad in got_grads.items():
        torch.testing.assert_close(grad, dict(model.named_parameters())[name].grad, atol=1e-5, rtol=1e-4)


def test_sampling_with_merged_adapters_leaves_the_weights_untouched():
    from transformers import LlamaForCausalLM

    from perl_core.policy.generation import merged_adapters

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, pad_token_id=0)
    model = attach_lora(LlamaForCausalLM(cfg), LoraConfig(rank=4), "CAUSAL_LM").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    x = torch.randint(1, 40, (3, 7))
    before = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    adapted = model(input_ids=x).logits
    with torch.no_grad():
        with model.disable_adapter():
            anchor = model(input_ids=x).logits
        with merged_adapters(model):
            merged = model(input_ids=x).logits
            swapped = [n for n, p in model.named_parameters() if p is not before[n][0]]
    assert len(swapped) == 2 * 4  # q, k, v and o of 2 layers ran on merged copies
    assert (adapted - anchor).abs().max() > 1e-2  # the adapter changes the logits: the check can fail
    torch.testing.assert_close(merged, adapted.detach(), atol=1e-5, rtol=1e-5)
    for name, p in model.named_parameters():  # the same tensors, bit for bit, and the adapter active again
        assert p is before[name][0] and torch.equal(p, before[name][1]), name
    assert torch.equal(model(input_ids=x).logits, adapted)
    with torch.autocast("cpu", dtype=torch.bfloat16), merged_adapters(model):  # 16-bit matmuls: not folded
        assert all(p is before[n][0] for n, p in model.named_parameters())
    plain = LlamaForCausalLM(cfg)
    with merged_adapters(plain):  # no adapters: nothing to fold
        assert all(p is q for p, q in zip(plain.parameters(), plain.parameters()))


def test_split_rows_by_cost_by_hand():
    from perl_core.packing import split_rows

    assert split_rows(35, [25, 25], None) == [[0, 1]]
    assert split_rows(35, [25, 25], hidden_size=512) == [[0, 1]]  # 85 + 85^2/3072 < 2 * (60 + 60^2/3072)
    # 8 responses as long as the prompt on a narrow model (L + L^2/384 per row): one row of 1152 tokens costs
    # 4608, 2 rows of 640 cost 3413, 4 rows of 384 cost 3072, 8 rows of 256 cost 3413: 4 rows
    assert split_rows(128, [128] * 8, hidden_size=64) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert split_rows(64, [256] * 8, hidden_size=64) == [[i] for i in range(8)]  # long responses: one row each


def test_split_groups_give_the_unpacked_scores():
    torch.manual_seed(0)
    model = _llama("sdpa").eval()
    prompt = [3, 4, 5]
    group = [prompt + [7 + i] * 30 for i in range(4)]  # long continuations on a 32-wide model: split
    from perl_core.packing import pack, read_packed_scores

    packed = pack([(prompt, [s[3:] for s in group])], 0, hidden_size=32)
    assert packed.input_ids.shape[0] > 1 and packed.rows.tolist() == sorted(packed.rows.tolist())
    got = read_packed_scores(model.model, model.score, packed)
    ref = sequence_scores(model, *pad_rows(group, 0, side="right"))
    torch.testing.assert_close(got, ref.detach(), atol=1e-5, rtol=1e-5)

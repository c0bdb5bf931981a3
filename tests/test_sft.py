"""The anchor (SFT) on scratch:llama-micro: response-only loss, full and LoRA (merged) artifacts, exact resume."""
import shutil

import pytest
import torch
from safetensors.torch import load_file

import perl_core.data
from perl_core.artifacts import read_manifest
from perl_core.checkpoints import latest_checkpoint
from perl_core.config import build_config
from perl_core.errors import UserError
from perl_core.modeling import build_scratch_backbone, load_causal_lm, load_tokenizer
from perl_core.sft import collate, encode_rows, response_loss, train_anchor

ROWS = [{"prompt": f"Customer: a {s} {d} with {m} milk\nAgent:", "response": f" One {s} {d} with {m} milk."}
        for s in ("small", "large", "medium") for d in ("latte", "mocha", "flat white") for m in ("oat", "soy")]


@pytest.fixture
def sft_data(monkeypatch):
    """The data API reads ROWS (train) and the last 4 (validation)."""
    views = {"train": ROWS[:-4], "validation": ROWS[-4:]}
    monkeypatch.setattr(perl_core.data, "load_rows", lambda cfg, view, split: views[split], raising=False)
    monkeypatch.setattr(perl_core.data, "corpus", lambda cfg: [r["prompt"] + r["response"] for r in ROWS],
                        raising=False)
    monkeypatch.setattr("perl_core.data.versioning.recorded_version", lambda: {"md5": "test"})


def cfg_for(tmp_path, tuning, steps=30):
    return build_config({"artifacts_dir": str(tmp_path / "artifacts"), "sft": {
        "backbone": {"name": "scratch:llama-micro", "vocab_size": 300}, "tuning": tuning, "lora": {"rank": 4},
        "train": {"batch_size": 8, "max_steps": steps, "learning_rate": 0.01, "eval_every": 10,
                  "checkpoint_every": 10, "warmup_ratio": 0.0}}})


def test_loss_counts_response_tokens_only(tmp_path):
    base = build_scratch_backbone("llama-micro", [r["prompt"] + r["response"] for r in ROWS], tmp_path, 300)
    tok, model = load_tokenizer(str(base)), load_causal_lm(str(base))
    examples, dropped = encode_rows(tok, ROWS[:3], max_length=64)
    assert dropped == 0
    loss, metrics = response_loss(model, collate(examples, tok.pad_token_id))
    total, count = 0.0, 0
    for ids, start in examples:  # manual: -log p of every response token (and EOS), each row unpadded
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
        total -= sum(float(logp[t - 1, ids[t]]) for t in range(start, len(ids)))
        count += len(ids) - start
    assert metrics["response_tokens"] == count
    assert float(loss.detach()) == pytest.approx(total / count, rel=1e-5)
    # the prompt carries no loss: changing a prompt token changes the loss only through the context
    ids, start = examples[0]
    assert start > 1 and collate(examples, tok.pad_token_id)["loss_mask"][0, :start].sum() == 0


def test_full_sft_learns_and_writes_a_plain_anchor(tmp_path, sft_data):
    result = train_anchor(cfg_for(tmp_path, "full"), tmp_path / "anchor")
    manifest = read_manifest(tmp_path / "anchor", expect_kind="anchor")
    assert manifest["tuning"] == "full" and manifest["data_version"] == {"md5": "test"}
    assert result.metrics["val_loss"] < 2.0  # a random micro model starts near log(300) = 5.7 nats/token
    assert manifest["metrics"]["trainable_params"] == manifest["metrics"]["total_params"]
    assert not (tmp_path / "anchor" / "adapter_config.json").exists()
    load_causal_lm(str(tmp_path / "anchor"))


def test_lora_sft_saves_merged_weights_that_differ_only_in_adapted_layers(tmp_path, sft_data):
    cfg = cfg_for(tmp_path, "lora", steps=10)
    result = train_anchor(cfg, tmp_path / "anchor")
    assert result.metrics["trainable_params"] < result.metrics["total_params"] / 5
    assert not (tmp_path / "anchor" / "adapter_config.json").exists()  # merged: a plain causal LM
    base_dir = read_manifest(tmp_path / "anchor")["base_model"]
    base = load_file(f"{base_dir}/model.safetensors")
    merged = load_file(str(tmp_path / "anchor" / "model.safetensors"))
    assert base.keys() == merged.keys()
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(any(m in k for m in ("q_proj", "k_proj", "v_proj", "o_proj")) for k in changed)


class Stop(Exception):
    pass


def comparable_manifest(folder) -> dict:
    """The manifest less what differs between two identical runs: its timestamp and timings."""
    manifest = read_manifest(folder)
    del manifest["created"]
    return manifest | {"metrics": {k: v for k, v in manifest["metrics"].items() if "second" not in k}}


@pytest.mark.parametrize("stop_at", [7, "after the last checkpoint"])
def test_resume_after_evaluations_writes_the_same_anchor(tmp_path, sft_data, stop_at):
    cfg = cfg_for(tmp_path, "lora", steps=8)
    cfg.sft.train.learning_rate, cfg.sft.train.eval_every, cfg.sft.train.checkpoint_every = 0.3, 2, 2
    straight = train_anchor(cfg, tmp_path / "straight")
    # at this learning rate validation loss rises again after step 4: the best weights are not the last ones
    assert straight.metrics["best_val_loss"] < straight.metrics["val_loss"]
    if stop_at == "after the last checkpoint":  # what a run killed after its last checkpoint leaves on disk
        shutil.copytree(tmp_path / "straight" / "checkpoints", tmp_path / "stopped" / "checkpoints")
    else:  # killed after the evaluations at steps 2, 4 and 6: it resumes from step 6

        def stop(metrics, step):
            if step == stop_at:
                raise Stop

        with pytest.raises(Stop):
            train_anchor(cfg, tmp_path / "stopped", callback=stop)
    resumed_from = latest_checkpoint(tmp_path / "stopped" / "checkpoints")
    train_anchor(cfg, tmp_path / "stopped", resume=True)
    weights = "model.safetensors"
    assert (tmp_path / "stopped" / weights).read_bytes() == (tmp_path / "straight" / weights).read_bytes()
    assert comparable_manifest(tmp_path / "stopped") == comparable_manifest(tmp_path / "straight")
    assert (resumed_from / "best.safetensors").exists()  # the run resumed with its best weights kept apart


def test_early_stopping_without_validation_rows_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(perl_core.data, "load_rows", lambda cfg, view, split: ROWS if split == "train" else [],
                        raising=False)
    monkeypatch.setattr(perl_core.data, "corpus", lambda cfg: [r["prompt"] + r["response"] for r in ROWS],
                        raising=False)
    cfg = cfg_for(tmp_path, "full", steps=2)
    cfg.sft.train.early_stopping_patience = 2
    with pytest.raises(UserError, match=r"sft.train.early_stopping_patience needs validation rows to stop on"):
        train_anchor(cfg, tmp_path / "anchor")


def test_eval_examples_scores_a_seeded_sample_of_the_validation_rows(tmp_path, sft_data, monkeypatch):
    import perl_core.sft as sft_module

    seen = []
    real = sft_module.validation_loss
    monkeypatch.setattr(sft_module, "validation_loss",
                        lambda model, examples, *a, **k: seen.append(list(examples)) or real(model, examples, *a, **k))
    cfg = cfg_for(tmp_path, "lora", steps=10)
    train_anchor(cfg, tmp_path / "all")
    assert len(seen[-1]) == 4  # every validation row
    cfg.sft.eval_examples = 2
    train_anchor(cfg, tmp_path / "two")
    assert len(seen[-1]) == 2 and all(row in seen[0] for row in seen[-1])

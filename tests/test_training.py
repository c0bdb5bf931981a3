"""The shared loop: exact resume, NaN guard, early stopping, schedule, precision. A linear model keeps it fast."""
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from perl_core import devices
from perl_core.callbacks import collect
from perl_core.config import TrainConfig
from perl_core.errors import NonFiniteError, UserError
from perl_core.checkpoints import latest_checkpoint
from perl_core.training import make_scheduler, train_loop

X = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
Y = X @ torch.tensor([1.0, -2.0, 3.0, 0.5])


def batches(epoch):
    order = torch.randperm(64, generator=torch.Generator().manual_seed(epoch))
    return [(X[order[i:i + 8]], Y[order[i:i + 8]]) for i in range(0, 64, 8)]


def mse(model, batch):
    x, y = batch
    return ((model(x).squeeze(-1) - y) ** 2).mean(), {"batch_size": len(x)}


def fresh(seed=1):
    torch.manual_seed(seed)
    return nn.Linear(4, 1)


CFG = TrainConfig(learning_rate=0.05, max_steps=20, checkpoint_every=5, eval_every=5, grad_accum=2)


class Stop(Exception):
    pass


def test_resume_after_a_stop_reaches_the_same_weights(tmp_path):
    straight = fresh()
    train_loop(straight, batches, mse, CFG, checkpoint_dir=tmp_path / "a")

    interrupted = fresh()

    def stop_at_12(metrics, step):
        if step == 12:
            raise Stop

    with pytest.raises(Stop):
        train_loop(interrupted, batches, mse, CFG, checkpoint_dir=tmp_path / "b", callback=stop_at_12)
    assert latest_checkpoint(tmp_path / "b").name == "step-000010"
    resumed = fresh(seed=99)  # different init: everything must come from the checkpoint
    result = train_loop(resumed, batches, mse, CFG, checkpoint_dir=tmp_path / "b", resume=True)
    assert result.step == 20
    assert torch.equal(resumed.weight, straight.weight) and torch.equal(resumed.bias, straight.bias)


SCORES = {5: 0.5, 10: 0.9, 15: 0.7, 20: 0.6}  # the best evaluation is the second: later weights are worse
WITH_EVAL = {"max_steps": CFG.model_copy(update={"max_steps": 20}),
             "early_stopping": CFG.model_copy(update={"max_steps": 50, "early_stopping_patience": 2})}


class Scripted:
    """An evaluation scored by the step it runs at (SCORES), and a callback that stops the run at `stop_at`
    (or kills the process with SIGKILL, as `kill -9` does)."""

    def __init__(self, stop_at=None, kill=False):
        self.step, self.stop_at, self.kill = 0, stop_at, kill

    def callback(self, metrics, step):
        self.step = step
        if step == self.stop_at:
            if self.kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise Stop

    def evaluate(self, model):
        return {"acc": SCORES.get(self.step, 0.0)}


def run_scripted(checkpoint_dir, cfg, stop_at=None, resume=False, kill=False, seed=1):
    model, script = fresh(seed), Scripted(stop_at, kill)
    result = train_loop(model, batches, mse, cfg, eval_fn=script.evaluate, eval_metric="acc", callback=script.callback,
                        checkpoint_dir=checkpoint_dir, resume=resume)
    return model, result


def assert_same_end(a, b):
    (model_a, result_a), (model_b, result_b) = a, b
    assert torch.equal(model_a.weight, model_b.weight) and torch.equal(model_a.bias, model_b.bias)
    for key in ("step", "best_metric", "best_step", "stopped_early", "last_eval"):
        assert getattr(result_a, key) == getattr(result_b, key), key


@pytest.mark.parametrize("setting", WITH_EVAL)
@pytest.mark.parametrize("stop_at", [7, 12, 17, "after the last checkpoint"])
def test_resume_after_evaluations_ends_like_an_uninterrupted_run(tmp_path, setting, stop_at):
    cfg = WITH_EVAL[setting]
    straight = run_scripted(tmp_path / "a", cfg)
    assert straight[1].best_step == 10 and straight[1].step == 20
    assert straight[1].stopped_early == (setting == "early_stopping")
    if stop_at == "after the last checkpoint":  # a finished loop: the checkpoint of its last step is on disk
        run_scripted(tmp_path / "b", cfg)
    else:
        with pytest.raises(Stop):
            run_scripted(tmp_path / "b", cfg, stop_at=stop_at)
    ckpt = latest_checkpoint(tmp_path / "b")
    assert_same_end(run_scripted(tmp_path / "b", cfg, resume=True, seed=99), straight)
    # the best weights (step 10) travel beside the latest ones only when they differ from them
    assert (ckpt / "best.safetensors").exists() == (int(ckpt.name[-6:]) > 10)


def test_resume_after_kill_9_ends_like_an_uninterrupted_run(tmp_path):
    cfg = WITH_EVAL["max_steps"]
    here = Path(__file__).parent
    code = (f"import sys; sys.path.insert(0, {str(here)!r}); import test_training as t; "
            f"t.run_scripted({str(tmp_path / 'b')!r}, t.WITH_EVAL['max_steps'], stop_at=17, kill=True)")
    killed = subprocess.run([sys.executable, "-c", code], env=os.environ | {"PYTHONPATH": str(here.parent)})
    assert killed.returncode == -signal.SIGKILL
    assert latest_checkpoint(tmp_path / "b").name == "step-000015"
    assert_same_end(run_scripted(tmp_path / "b", cfg, resume=True, seed=99), run_scripted(tmp_path / "a", cfg))


def test_an_older_checkpoint_without_its_best_weights_resumes_with_a_warning(tmp_path):
    cfg = WITH_EVAL["max_steps"]
    with pytest.raises(Stop):
        run_scripted(tmp_path, cfg, stop_at=17)
    (latest_checkpoint(tmp_path) / "best.safetensors").unlink()
    with pytest.warns(UserWarning, match=r"step-000015 records best_step=10 but holds no best.safetensors"):
        _, result = run_scripted(tmp_path, cfg, resume=True)
    assert result.step == 20 and result.best_step == 10


def test_checkpoints_hold_no_pickles(tmp_path):
    train_loop(fresh(), batches, mse, CFG.model_copy(update={"max_steps": 5}), checkpoint_dir=tmp_path)
    ckpt = latest_checkpoint(tmp_path)
    assert sorted(p.name for p in ckpt.iterdir()) == ["optimizer.safetensors", "rng.safetensors", "state.json",
                                                     "trainable.safetensors"]
    assert json.loads((ckpt / "state.json").read_text())["step"] == 5


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    def poisoned(model, batch):
        loss, m = mse(model, batch)
        return (loss * float("nan") if poisoned.calls > 13 else loss), m

    def counting(model, batch):
        poisoned.calls += 1
        return poisoned(model, batch)

    poisoned.calls = 0
    with pytest.raises(NonFiniteError, match=r"training loss became nan at step 7; .*step-000005"):
        train_loop(fresh(), batches, counting, CFG, checkpoint_dir=tmp_path)
    assert latest_checkpoint(tmp_path).name == "step-000005"


def test_early_stopping_restores_the_best_weights():
    scores = iter([0.5, 0.9, 0.7, 0.6, 0.4])
    snapshots = {}

    def evaluate(model):
        snapshots[len(snapshots)] = model.weight.detach().clone()
        return {"acc": next(scores)}

    model = fresh()
    cfg = CFG.model_copy(update={"early_stopping_patience": 2, "max_steps": 50})
    history = []
    result = train_loop(model, batches, mse, cfg, eval_fn=evaluate, eval_metric="acc", callback=collect(history))
    assert result.stopped_early and result.step == 20 and result.best_step == 10
    assert torch.equal(model.weight, snapshots[1])
    assert [s for s, m in history if "eval/acc" in m] == [5, 10, 15, 20]


@pytest.mark.parametrize("schedule, at_end", [("linear", 0.0), ("cosine", 0.0), ("constant", 1.0)])
def test_warmup_then_decay(schedule, at_end):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(opt, TrainConfig(max_steps=100, warmup_ratio=0.1, schedule=schedule))
    lrs = []
    for _ in range(100):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1 / 11)
    assert lrs[10] == pytest.approx(1.0)
    assert sched.get_last_lr()[0] == pytest.approx(at_end)
    if schedule == "cosine":
        assert lrs[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))


# ---------------------------------------------------------------- precision
def test_bf16_autocasts_the_training_and_validation_forwards_on_a_cpu():
    seen = {"train": set(), "eval": set()}
    model = fresh()
    model.register_forward_hook(lambda m, i, out: seen["train" if torch.is_grad_enabled() else "eval"].add(out.dtype))
    cfg = CFG.model_copy(update={"precision": "bf16", "max_steps": 5})
    train_loop(model, batches, mse, cfg, eval_fn=lambda m: {"loss": float(mse(m, batches(0)[0])[0])},
               eval_metric="loss", eval_mode="min")
    assert seen == {"train": {torch.bfloat16}, "eval": {torch.bfloat16}}
    assert model.weight.dtype == torch.float32  # mixed precision: the weights stay fp32
    fp32 = fresh()
    train_loop(fp32, batches, mse, cfg.model_copy(update={"precision": "fp32"}))
    assert not torch.equal(fp32.weight, model.weight)
    assert torch.allclose(fp32.weight, model.weight, atol=0.05)  # the same training, in bf16 rounding


def test_fp16_is_refused_on_a_cpu_with_what_would_work():
    with pytest.raises(UserError, match=r"train.precision='fp16' needs a CUDA GPU; this run is on cpu: use 'bf16'"):
        train_loop(fresh(), batches, mse, CFG.model_copy(update={"precision": "fp16"}))


@pytest.fixture
def fp16_on_cpu(monkeypatch):
    """fp16 with loss scaling on the CPU (torch has both there) as a stand-in for a GPU."""
    real = devices.autocast_dtype
    monkeypatch.setattr(devices, "autocast_dtype",
                        lambda precision, device, setting="train.precision":
                        torch.float16 if precision == "fp16" else real(precision, device, setting))


def test_fp16_skips_overflowing_steps_and_resumes_with_its_loss_scale(tmp_path, fp16_on_cpu):
    cfg = CFG.model_copy(update={"precision": "fp16"})
    straight = fresh()
    history = []
    train_loop(straight, batches, mse, cfg, checkpoint_dir=tmp_path / "a", callback=collect(history))
    scaler = json.loads((latest_checkpoint(tmp_path / "a") / "state.json").read_text())["extra"]["grad_scaler"]
    # the initial scale (2^16) overflows fp16 in the backward: those steps are skipped (no NonFiniteError)
    # and the scale halves until the gradients fit
    assert scaler["scale"] < 65536.0 and any(math.isinf(m["train/grad_norm"]) for _, m in history)
    assert not torch.equal(straight.weight, fresh().weight)

    def stop_at_12(metrics, step):
        if step == 12:
            raise Stop

    with pytest.raises(Stop):
        train_loop(fresh(), batches, mse, cfg, checkpoint_dir=tmp_path / "b", callback=stop_at_12)
    resumed = fresh(seed=99)
    train_loop(resumed, batches, mse, cfg, checkpoint_dir=tmp_path / "b", resume=True)
    assert torch.equal(resumed.weight, straight.weight) and torch.equal(resumed.bias, straight.bias)


def test_eval_subset_is_a_seeded_ordered_sample_or_everything():
    import random

    from perl_core.training import eval_subset

    assert eval_subset(5, None, 0) == [0, 1, 2, 3, 4] and eval_subset(5, 5, 0) == [0, 1, 2, 3, 4]
    assert eval_subset(10, 3, 7) == sorted(random.Random(7).sample(range(10), 3))
    assert eval_subset(10, 3, 7) == eval_subset(10, 3, 7) != eval_subset(10, 3, 8)

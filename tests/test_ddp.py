"""Data-parallel training under `accelerate launch --num_processes 2 --cpu` (gloo), against one process.

tests/ddp_worker.py takes one optimisation step of SFT (batch 8), the reward model (batch 8) and
RL (2 prompts x k=2 on a fixed set of samples); one launch of two processes (4 rows each) must
write the weights one process writes, from disjoint shards of the same batches, with every file
written by rank 0 only.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from perl_core import parallel
from perl_core.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "ddp_worker.py"
WEIGHTS = {"anchor": "model.safetensors", "reward_model": "adapter_model.safetensors",
           "policy": "adapter_model.safetensors"}


def run(args: list[str], out: Path, **env_vars: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **env_vars)
    done = subprocess.run(args + [str(WORKER), str(out)], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    run([sys.executable], one)
    # `--cpu` alone is accelerate's one-process (or mpirun) launcher; torchrun's two processes on the
    # CPU are `--multi_gpu` with ACCELERATE_USE_CPU=1 (gloo), as the README shows
    run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
         str(29500 + os.getpid() % 1000)], two, ACCELERATE_USE_CPU="1", PERL_TEST_RESUME="1")
    probes = [json.loads((two / "probe" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    return one, two, json.loads((one / "probe" / "rank-0.json").read_text()), probes


def files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


@pytest.mark.parametrize("stage", ["anchor", "reward_model"])
def test_two_processes_of_batch_4_take_the_step_of_one_process_of_batch_8(launches, stage):
    one, two, _, probes = launches
    assert [p["world"] for p in probes] == [2, 2]
    a = load_file(str(one / "artifacts" / stage / WEIGHTS[stage]))
    b = load_file(str(two / "artifacts" / stage / WEIGHTS[stage]))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=f"{stage}: {name}")
    # the step moved the weights (from the scratch backbone; a fresh LoRA's B is zero), so equal weights are equal steps
    if stage == "anchor":
        start = load_file(str(next((one / "artifacts" / "backbones").glob("*/model.safetensors"))))
        assert max(float((a[n] - start[n]).abs().max()) for n in a) > 1e-3
    else:
        assert max(float(a[n].abs().max()) for n in a if "lora_B" in n) > 1e-3


@pytest.mark.parametrize("algorithm", ["rl", "grpo"])  # rloo; grpo with the dapo loss, mu = 2, k3 in the loss
def test_rl_update_on_the_same_samples_has_the_one_process_gradient(launches, algorithm):
    _, _, single, probes = launches
    key = f"{algorithm}_gradient"
    assert single[key], "the RL step recorded no gradient"
    for probe in probes:  # after DDP's all-reduce every process holds the whole batch's gradient
        assert probe[key].keys() == single[key].keys()
        for name, grad in single[key].items():
            torch.testing.assert_close(torch.tensor(probe[key][name]), torch.tensor(grad),
                                       rtol=1e-4, atol=1e-6, msg=name)


def test_each_process_sees_a_disjoint_shard_of_the_same_batches(launches):
    _, _, single, (rank0, rank1) = launches
    assert single["seen"] == [] or all(s["batch"] == s["shard"] for s in single["seen"])
    assert len(rank0["seen"]) == len(rank1["seen"]) >= 3  # SFT, reward model, RL (and more: one per micro-batch)
    for mine, theirs in zip(rank0["seen"], rank1["seen"]):
        assert mine["batch"] == theirs["batch"]
        assert not set(mine["shard"]) & set(theirs["shard"])
        assert sorted(mine["shard"] + theirs["shard"]) == sorted(mine["batch"])
        assert len(mine["shard"]) == len(theirs["shard"]) == len(mine["batch"]) // 2


@pytest.mark.parametrize("stage", ["rm", "policy"])
def test_a_resumed_two_process_run_ends_where_a_straight_one_ends(launches, stage):
    _, two, _, probes = launches
    assert probes[0]["resumed_steps"][stage] == 1  # the resumed run trained step 2 only: it did not start over
    # the weights after step 2 (the step-2 checkpoint: the reward model's best-step choice cannot hide a difference)
    straight, resumed = (load_file(str(two / "artifacts" / "resume" / f"{stage}_{run}" / "checkpoints" / "step-000002" /
                                       "trainable.safetensors")) for run in ("straight", "resumed"))
    assert straight.keys() == resumed.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=1e-6,
                                   msg=lambda detail, name=name: f"{stage}: {name}: {detail}")
    assert max(float(straight[n].abs().max()) for n in straight if "lora_B" in n) > 1e-4  # B starts at 0: the steps moved it


def test_only_the_main_process_writes(launches):
    one, two, _, (rank0, rank1) = launches
    assert rank0["writes"], "the audit hook saw no write on the main process"
    assert rank1["writes"] == []
    for stage in ("anchor", "reward_model", "policy"):  # the same files as one process writes, no leftovers
        assert files(two / "artifacts" / stage) == files(one / "artifacts" / stage)


def test_a_global_batch_that_does_not_split_evenly_names_the_setting(monkeypatch):
    monkeypatch.setattr(parallel, "world_size", lambda: 3)
    with pytest.raises(UserError, match=r"reward\.train\.batch_size=8 .*3 processes"):
        parallel.per_process(8, "reward.train.batch_size")
    assert parallel.per_process(9, "reward.train.batch_size") == 3


def test_rl_under_several_processes_needs_a_whole_batch_of_prompts(monkeypatch):
    from perl_core.config import build_config
    from perl_core.policy import rl

    monkeypatch.setattr(parallel, "world_size", lambda: 2)
    monkeypatch.setattr(rl, "prompts_within", lambda tok, prompts, limit: [(p, [1, 2]) for p in prompts])
    cfg = build_config({"policy": {"train": {"batch_size": 4}}}).policy
    with pytest.raises(UserError, match=r"only 3 prompts .*policy\.train\.batch_size=4: under 2 processes"):
        rl.rl_loop(None, None, ["a", "b", "c"], cfg)  # refused before any model is touched
    monkeypatch.setattr(parallel, "world_size", lambda: 1)  # one process: a smaller batch of every prompt is fine
    with pytest.raises(AttributeError):  # it gets as far as the (absent) roles
        rl.rl_loop(None, None, ["a", "b", "c"], cfg)


def test_auto_precision_follows_accelerate_launch_mixed_precision(monkeypatch):
    from perl_core.devices import autocast_dtype

    cpu = torch.device("cpu")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert autocast_dtype("auto", cpu) == torch.bfloat16
    assert autocast_dtype("fp32", cpu) is None  # an explicit setting wins over the launch flag
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(UserError, match="auto, from accelerate launch --mixed_precision.*CUDA"):
        autocast_dtype("auto", cpu, "reward.train.precision")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # the launcher's default: auto decides as without it
    assert autocast_dtype("auto", cpu) is None

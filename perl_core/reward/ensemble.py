"""Reward-model ensembles (Coste et al., ICLR 2024): N reward models trained alike, RL on a conservative aggregate.

Members differ by seed (`reward.train.seed + i`) and, with `reward.ensemble.bootstrap`, by a
resample of the training rows. Each member is an ordinary reward-model folder, so whatever reads
one reward model reads a member, and each member is scored through the single reward model's path:

    ensemble/                      manifest.json: kind reward_ensemble, members (folder, seed, offset), metrics
      member_0/ ... member_{N-1}/  each a reward_model artifact (adapter + head, tokenizer, manifest)

For member scores r_1..r_N of one (prompt, response):

    c_m            = r_m - offset_m               a Bradley-Terry member sees only differences, so its scores
                                                  carry an offset of their own: offset_m is its mean score on
                                                  the validation responses (pointwise members score logits: 0)
    mean           = (1/N) sum_m c_m
    min            = min_m c_m                    worst case (WCO)
    mean_minus_std = mean - lambda * std_m(c_m)   uncertainty-weighted (UWO); population std, 0 for one member

RL (`perl_core.policy.roles.build_ensemble_roles`): LoRA members of the anchor all sit on the policy's backbone as the
adapters reward_0..reward_{N-1}, each with its own head: the weights exist once, each member adds
its adapter and head, and a step costs N reward forwards. Any other reward model is loaded once per
member (N scorers). Evaluation and serving (`EnsembleScorer`) put LoRA members on one base as well.
"""
from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

from perl_core import data as data_api
from perl_core import parallel
from perl_core.artifacts import ENSEMBLE_KIND, MANIFEST, StageResult, read_manifest, write_manifest
from perl_core.callbacks import MetricsCallback, null_callback
from perl_core.config import ConfigError, PerlConfig, PolicyConfig
from perl_core.devices import autocast, run_device
from perl_core.errors import UserError
from perl_core.modeling import fit_embeddings, load_sequence_scorer, load_tokenizer, quiet_transformers
from perl_core.reward.train import RewardScorer, encode_rows, reward_metrics, score_examples, train_reward_model
from perl_core.scoring import is_encoder_head

AGGREGATIONS = ("mean", "min", "mean_minus_std")


def member_adapter(i: int) -> str:
    """The adapter name of member i wherever members share one backbone."""
    return f"reward_{i}"


def member_folder(i: int) -> str:
    return f"member_{i}"


# ---------------------------------------------------------------- the math
def centre(scores: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """c_m = r_m - offset_m for member scores [N members, n samples]."""
    return scores - torch.as_tensor(offsets, dtype=scores.dtype)[:, None]


def member_std(scores: torch.Tensor) -> torch.Tensor:
    """The members' spread per sample: the population std over members (0 for an ensemble of one)."""
    return scores.std(0, unbiased=False)


def aggregate(scores: torch.Tensor, how: str, lam: float = 1.0) -> torch.Tensor:
    """One reward per sample from member scores [N members, n samples]: mean, min or mean - lam * std."""
    if how == "mean":
        return scores.mean(0)
    if how == "min":
        return scores.min(0).values
    if how == "mean_minus_std":
        return scores.mean(0) - lam * member_std(scores)
    raise ConfigError(f"policy.ensemble_aggregation is {how!r}; expected one of {', '.join(AGGREGATIONS)}")


# ---------------------------------------------------------------- the artifact
@dataclass
class EnsembleSpec:
    path: Path
    manifest: dict
    member_dirs: list[Path]
    offsets: torch.Tensor


def read_ensemble(path: str | Path) -> EnsembleSpec:
    path = Path(path)
    manifest = read_manifest(path, expect_kind=ENSEMBLE_KIND)
    members = manifest.get("members")
    if not isinstance(members, list) or not members:
        raise UserError(f"{path / MANIFEST}: `members` must list the member folders (member_0, ...), got {members!r}")
    dirs = []
    for i, member in enumerate(members):
        if not isinstance(member, dict) or not isinstance(member.get("folder"), str) \
                or not isinstance(member.get("offset"), (int, float)):
            raise UserError(f"{path / MANIFEST}: members[{i}] needs a `folder` and an `offset`, got {member!r}")
        dirs.append(path / member["folder"])
        read_manifest(dirs[-1], expect_kind="reward_model")  # names a missing or foreign member folder
    offsets = torch.tensor([float(m["offset"]) for m in members])
    return EnsembleSpec(path, manifest, dirs, offsets)


# ---------------------------------------------------------------- training
def bootstrap_rows(rows: list[dict], seed: int) -> list[dict]:
    """len(rows) rows drawn with replacement: a member's own view of the training data."""
    return random.Random(f"bootstrap:{seed}").choices(rows, k=len(rows))


def validation_rows(cfg: PerlConfig) -> tuple[list[dict], list[int]]:
    """The validation rows (and their 1-based numbers) a reward model with `cfg` evaluates on: the same
    `reward.eval_examples` sample `train_reward_model` draws, so member 0 and a lone reward model agree."""
    rows = data_api.load_rows(cfg.data, cfg.reward.objective, "validation")
    picked = list(range(len(rows)))
    if cfg.reward.eval_examples is not None and len(rows) > cfg.reward.eval_examples:
        picked = sorted(random.Random(cfg.reward.train.seed).sample(picked, cfg.reward.eval_examples))
    return [rows[i] for i in picked], [i + 1 for i in picked]


def train_reward_ensemble(cfg: PerlConfig, out_dir: str | Path, callback: MetricsCallback = null_callback,
                          resume: bool = False, base_model: Optional[str] = None,
                          train_rows: Optional[list[dict]] = None) -> StageResult:
    """Train `reward.ensemble.size` reward models into `out_dir/member_i` and write the ensemble's manifest.

    Member i is `train_reward_model` with seed `reward.train.seed + i` (member 0 is the reward model
    `reward train` would give), on a bootstrap resample when `reward.ensemble.bootstrap`. Its metrics
    reach `callback` as `member_i/...` at steps i * max_steps + step. With `resume`, finished members
    are kept and an unfinished one continues from its checkpoint. `train_rows` replaces the training split.
    """
    rcfg = cfg.reward
    size = rcfg.ensemble.size
    if size is None:
        raise ConfigError("reward.ensemble.size is not set: give the number of members (e.g. 4)")
    out = Path(out_dir)
    if rcfg.ensemble.bootstrap and train_rows is None:
        train_rows = data_api.load_rows(cfg.data, rcfg.objective, "train")
    steps = rcfg.train.max_steps
    members = []
    for i in range(size):
        member_cfg = cfg.model_copy(deep=True)
        member_cfg.reward.train.seed = seed = rcfg.train.seed + i
        folder = out / member_folder(i)
        if not (resume and (folder / MANIFEST).exists()):
            rows = bootstrap_rows(train_rows, seed) if rcfg.ensemble.bootstrap else train_rows

            def member_callback(metrics: dict[str, float], step: int, i: int = i) -> None:
                callback({f"member_{i}/{k}": v for k, v in metrics.items()}, i * steps + step)

            train_reward_model(member_cfg, folder, callback=member_callback, resume=resume, base_model=base_model,
                               train_rows=rows)
            if parallel.is_main():  # finished: resume keeps it as it is
                shutil.rmtree(folder / "checkpoints", ignore_errors=True)
        members.append({"folder": member_folder(i), "seed": seed, "bootstrap": rcfg.ensemble.bootstrap})

    # every member on the same validation rows: the offsets, each member's metrics, the ensemble's
    first = read_manifest(out / member_folder(0), expect_kind="reward_model")
    scorer = EnsembleScorer.from_members([out / m["folder"] for m in members], first["base_model"],
                                         aggregation="mean", precision=rcfg.train.precision)
    rows, _ = validation_rows(cfg)
    examples, _ = encode_rows(rows, scorer.tokenizer, cfg, scorer.encoder, "validation")
    with autocast(rcfg.train.precision, run_device(), "reward.train.precision"):  # as the members' validation
        raw = torch.stack([score_examples(s.model, examples, rcfg.objective, s.tokenizer.pad_token_id,
                                          rcfg.train.batch_size * 2) for s in scorer.each_member()])
    scorer.offsets = raw.mean(1) if rcfg.objective == "pairwise" else torch.zeros(size)
    for member, offset in zip(members, scorer.offsets.tolist()):
        member["offset"] = offset
    mean = scorer.combine(raw)
    metrics = {f"validation/{k}": v for k, v in reward_metrics(mean, examples, rcfg.objective, rcfg.margin).items()}
    for i, scores in enumerate(raw):
        metrics.update({f"validation/member_{i}/{k}": v
                        for k, v in reward_metrics(scores, examples, rcfg.objective, rcfg.margin).items()})
    metrics["validation/disagreement"] = float(scorer.spread(raw).mean())
    member_metrics = [read_manifest(out / m["folder"])["metrics"] for m in members]
    per_member = member_metrics[0].get("trainable_params", 0)
    metrics.update(ensemble_size=size, trainable_params=size * per_member,
                   # one backbone: the base weights once, each further member its adapter and head
                   total_params=member_metrics[0].get("total_params", 0) + (size - 1) * per_member,
                   steps=sum(m.get("steps", 0) for m in member_metrics),
                   train_seconds=sum(m.get("train_seconds", 0.0) for m in member_metrics))
    if parallel.is_main():
        write_manifest(out, kind=ENSEMBLE_KIND, base_model=first["base_model"], tuning=rcfg.tuning,
                       config=rcfg.model_dump(mode="json"), data_version=first.get("data_version"), metrics=metrics,
                       members=members, head=first["head"], objective=rcfg.objective, max_length=rcfg.max_length,
                       truncation=rcfg.truncation, data=first.get("data"))
    parallel.barrier()
    return StageResult(out_dir=out, metrics=metrics, artifacts={"reward_model": out})


# ---------------------------------------------------------------- inference
class EnsembleScorer:
    """An ensemble artifact for scoring text: LoRA members as adapters on ONE base model (full-tuned
    members as separate models). `score` returns the aggregate, `member_scores` each member's raw scores."""

    def __init__(self, scorers: list[RewardScorer], adapters: Optional[list[str]], offsets: torch.Tensor,
                 aggregation: Optional[str] = None, lam: Optional[float] = None):
        defaults = PolicyConfig()
        self.scorers, self.adapters, self.offsets = scorers, adapters, torch.as_tensor(offsets, dtype=torch.float32)
        self.aggregation = aggregation or defaults.ensemble_aggregation
        self.lam = defaults.ensemble_lambda if lam is None else lam
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"ensemble aggregation {self.aggregation!r}; expected one of {', '.join(AGGREGATIONS)}")
        first = scorers[0]
        self.tokenizer, self.max_length, self.encoder, self.truncation = (first.tokenizer, first.max_length,
                                                                           first.encoder, first.truncation)

    @classmethod
    def load(cls, path: str | Path, device: Optional[torch.device] = None, aggregation: Optional[str] = None,
             lam: Optional[float] = None, precision: str = "auto") -> "EnsembleScorer":
        spec = read_ensemble(path)
        return cls.from_members(spec.member_dirs, spec.manifest["base_model"], spec.offsets, device, aggregation, lam,
                                precision)

    @classmethod
    def from_members(cls, member_dirs: list[Path], base_model: str, offsets: Optional[torch.Tensor] = None,
                     device: Optional[torch.device] = None, aggregation: Optional[str] = None,
                     lam: Optional[float] = None, precision: str = "auto") -> "EnsembleScorer":
        """`device` and `precision` (auto | fp32 | bf16 | fp16) as in `RewardScorer.load`."""
        offsets = torch.zeros(len(member_dirs)) if offsets is None else offsets
        if not all((Path(d) / "adapter_config.json").exists() for d in member_dirs):
            return cls([RewardScorer.load(d, device, precision) for d in member_dirs], None, offsets, aggregation, lam)
        from peft import PeftModel

        manifest = read_manifest(member_dirs[0], expect_kind="reward_model")
        tokenizer = load_tokenizer(str(member_dirs[0]))
        adapters = [member_adapter(i) for i in range(len(member_dirs))]
        with quiet_transformers():
            base = fit_embeddings(load_sequence_scorer(base_model, tokenizer.pad_token_id), tokenizer)
            model = PeftModel.from_pretrained(base, str(member_dirs[0]), adapter_name=adapters[0])
            for name, member_dir in zip(adapters[1:], member_dirs[1:]):
                model.load_adapter(str(member_dir), adapter_name=name)
        model.to(device or run_device())
        shared = RewardScorer(model, tokenizer, manifest["max_length"], is_encoder_head(manifest["head"]),
                              manifest.get("truncation", "error"), precision)
        return cls([shared] * len(member_dirs), adapters, offsets, aggregation, lam)

    @property
    def size(self) -> int:
        return len(self.scorers)

    def each_member(self) -> Iterator[RewardScorer]:
        """Each member as a single reward model's scorer (its adapter made active on the shared base)."""
        for i, scorer in enumerate(self.scorers):
            if self.adapters is not None:
                scorer.model.set_adapter(self.adapters[i])
            yield scorer

    def member_scores(self, prompts, responses, batch_size: int = 32, truncation: Optional[str] = None) -> torch.Tensor:
        """Raw scores, [members, pairs], each member's from `RewardScorer.score` (same arguments)."""
        return torch.stack([s.score(prompts, responses, batch_size, truncation) for s in self.each_member()])

    def combine(self, raw: torch.Tensor, aggregation: Optional[str] = None, lam: Optional[float] = None) -> torch.Tensor:
        """The aggregate of raw member scores [members, pairs]; `aggregation`/`lam` override this scorer's."""
        return aggregate(centre(torch.as_tensor(raw), self.offsets), aggregation or self.aggregation,
                         self.lam if lam is None else lam)

    def spread(self, raw: torch.Tensor) -> torch.Tensor:
        return member_std(centre(torch.as_tensor(raw), self.offsets))

    def score(self, prompts, responses, batch_size: int = 32, truncation: Optional[str] = None) -> torch.Tensor:
        """One aggregate reward per (prompt, response), like `RewardScorer.score`."""
        return self.combine(self.member_scores(prompts, responses, batch_size, truncation))

    def score_and_spread(self, prompts, responses, batch_size: int = 32, aggregation: Optional[str] = None,
                         lam: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The aggregate (this scorer's, or `aggregation`/`lam`) and the members' spread per (prompt, response)."""
        raw = self.member_scores(prompts, responses, batch_size)
        return self.combine(raw, aggregation, lam), self.spread(raw)

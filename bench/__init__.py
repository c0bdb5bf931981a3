"""Efficiency measurement: PERL (LoRA) against full tuning, and against TRL.

The lab beside the library: bench imports perl_core, never the other way round (tests/test_layout.py).

    isolation.py    every setting in a fresh Python process (`run_isolated`), peak memory, ratios
    reward.py       the reward-model workload and the LoRA-vs-full reward benchmark
    policy.py       the policy-RL workload (one backbone vs three copies) and its benchmark
    trl_compare.py  TRL's RewardTrainer / RLOOTrainer beside ours (the optional `bench` extra)
    report.py       `perl-rlhf report efficiency`: all of the above, a rank sweep, one report

A benchmark resolves one `PerlConfig` per setting (the preset, then the benchmark's measurement
setting, then the caller's overrides, which win) and hands each workload that whole config; the
workload trains exactly what it receives. `benchmarks/*.py` are command lines over these functions.
"""

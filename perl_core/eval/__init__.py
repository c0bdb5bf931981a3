"""Evaluation: reporting (JSON, Markdown, plots), reward-model and policy evaluation (metrics: perl_core.metrics)."""

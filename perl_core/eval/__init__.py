"""Evaluation: metrics, reporting (JSON, Markdown, plots), reward-model and policy evaluation."""

"""PERL: parameter-efficient RLHF. The library: no Prefect, no MLflow."""
__version__ = "0.1.0"

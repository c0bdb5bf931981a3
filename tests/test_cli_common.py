"""The one metric printer every `perl-rlhf` training and evaluation command ends with."""
from flows.cli_common import metric_lines, print_metrics


def test_metric_lines_are_sorted_aligned_and_floats_have_four_decimals():
    metrics = {"validation/roc_auc": 0.912345, "loss": 0.5, "n_pairs": 12, "backbone": "scratch:llama-micro"}
    assert metric_lines(metrics) == [
        "  backbone            scratch:llama-micro",
        "  loss                0.5000",
        "  n_pairs             12",
        "  validation/roc_auc  0.9123",
    ]
    assert metric_lines({}) == []


def test_print_metrics_writes_the_lines_to_stderr_verbatim(capsys):
    print_metrics({"b": 1.0, "a[x]": "[bold]kept[/]"})  # brackets are data, not rich markup
    assert capsys.readouterr().err.splitlines() == ["  a[x]  [bold]kept[/]", "  b     1.0000"]

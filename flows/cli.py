"""`perl-rlhf`: the command line. Thin: every command loads the config and calls perl_core or a flow."""
from __future__ import annotations

import typer

from flows import cli_config
from flows import cli_data
from flows import cli_reward
from flows import cli_sft, cli_policy
from flows import cli_eval, cli_report
from flows import cli_pipeline

app = typer.Typer(help="PERL: parameter-efficient RLHF (LoRA reward models and LoRA policy RL) as a pipeline.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
app.add_typer(cli_config.app, name="config")
app.add_typer(cli_data.app, name="data")
app.add_typer(cli_reward.app, name="reward")
app.add_typer(cli_sft.app, name="sft")
app.add_typer(cli_policy.app, name="policy")
app.add_typer(cli_eval.app, name="eval")
app.add_typer(cli_report.app, name="report")
app.command("run")(cli_pipeline.run)
app.command("serve")(cli_pipeline.serve)
app.add_typer(cli_pipeline.registry_app, name="registry")

if __name__ == "__main__":
    app()

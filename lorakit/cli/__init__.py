"""The `lorakit` command line: each command parses its options, calls one function of the package that owns
the work, and prints what it returns.

Modules: `app` (the typer app, the options several commands share, errors -> exit codes), `train_command`,
`merge_command`, `export_command`, `eval_commands` (eval, generate, chat), `preflight_commands` (data preview, check, plan).
Heavy libraries (torch, transformers, ...) are imported inside the commands, so `lorakit --help` and a
rejected recipe answer in well under a second. A command function is long only by its option
declarations (typer reads them from the signature); its body is a few lines. Exports `app` and `main`.
"""

# isort: off
# importing a command module registers its commands; --help lists them in this order
from lorakit.cli import train_command, merge_command, export_command, eval_commands, preflight_commands  # noqa: F401
from lorakit.cli.app import app
# isort: on


def main() -> None:
    app()

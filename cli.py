"""The `signround` command line (Typer). Parses, validates, calls the library."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Quantize LLMs and VLMs with sign-gradient rounding.")


@app.command()
def version() -> None:
    """Print the installed signround version."""
    from signround import __version__

    typer.echo(__version__)


def main() -> None:
    app()

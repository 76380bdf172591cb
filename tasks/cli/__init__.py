"""The `finetune` command (typer), one module per command group; `main` is the console-script entry point."""

from tasks.cli.app import main

__all__ = ["main"]

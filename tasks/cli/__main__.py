"""`python -m tasks.cli ...` runs the `finetune` command."""

from tasks.cli.app import main

main()

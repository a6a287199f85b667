"""Subcommands of the `companion` CLI: one module each (HELP, add_arguments, run)."""

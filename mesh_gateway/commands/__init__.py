"""Command groups of the CLI: each module has `register(subparsers)` and handlers returning an exit code."""

"""One module per CLI subcommand (`python -m cifarlab <name>`), discovered by cli.py.

Each module defines NAME (str), HELP (one line), ``add_arguments(parser)`` and
``run(args) -> int``. Errors a user can cause are raised as CifarlabError; cli.py prints them
as ``error: ...`` and exits 2.
"""

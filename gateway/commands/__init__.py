"""Sub-commands of ``gateway``: one module each, found at start.

A module here defines ``register(subparsers)``, which adds its parser and sets
``func`` (a function taking the parsed arguments and returning the exit status).
Modules whose names start with ``_`` are helpers, not commands.
"""

"""Bounds that both the configuration and the command line check, in a module that imports nothing.

The command line validates ``--parallel`` while it parses arguments, before it loads (and so imports) the
configuration: ``graphsync --help`` must answer without pydantic.
"""

# Runs at once in one process: each is a thread with its own Graph and storage connections.
MAX_CONCURRENCY = 64

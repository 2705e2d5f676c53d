"""Subcommands of the `factedit` CLI, one module each (each exposes `register(sub)`)."""

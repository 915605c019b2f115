"""Command-line helpers: `python -m vdit_jax.tools.<name>`."""

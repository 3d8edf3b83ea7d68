"""Composition root: configuration, the `ledger-node` CLI, start-up and shutdown."""

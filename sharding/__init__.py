"""Pure sharding: slot map, routing, and the two-phase-commit protocol as a state machine.

Runs without Ray or PostgreSQL; imports only `ledger`.
"""

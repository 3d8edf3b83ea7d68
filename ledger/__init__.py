"""Pure accounting core: money, accounts, journals, balances, results, invariants.

No I/O, no clock, no randomness, no Ray. Everything else builds on this room.
"""

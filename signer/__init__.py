"""Canonical encoding and hashing of ledger objects (signing backends arrive with proofs)."""

"""Marketplace finance flows built on the ledger (invoices, payments, payouts, ...)."""

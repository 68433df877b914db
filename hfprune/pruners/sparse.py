"""Sparse pruners (being written)."""

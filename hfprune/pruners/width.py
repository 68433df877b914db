"""Width pruners (being written)."""

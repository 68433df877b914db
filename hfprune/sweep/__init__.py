"""Sweeps: a recipe's grid of cells, run with shared providers, and the dry run that plans it."""

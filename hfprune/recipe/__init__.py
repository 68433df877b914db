"""Recipes: the typed schema of one experiment, its sections, and the YAML file it is read from."""

"""Checks before any weights load: pre-flight over the recipe, the file system and the parent's config, and held-out overlap."""

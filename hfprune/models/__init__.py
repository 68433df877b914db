"""The models of a run as objects: reading the parent's config, model anatomy, placement on devices, the random-init twin."""

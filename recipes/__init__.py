"""The shipped recipes (`*.yaml`), installed as the `hfprune.recipes` package (see
`[tool.setuptools.package-dir]` in pyproject.toml) so `hfprune ls` and `hfprune validate` find them from
an installed wheel when the working directory has no `recipes/` folder.
"""

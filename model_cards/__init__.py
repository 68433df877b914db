"""Model card templates (Jinja, rendered by `hfprune.publish.cards`): one per model kind plus `_sections.md`.

They live at the top of the repository and are installed as the `hfprune.model_cards` package (see
`[tool.setuptools.package-dir]` in pyproject.toml), so `importlib.resources` finds them in a wheel and in
an editable install alike.
"""

"""The one packaging fact pyproject.toml cannot express: the package list is everything found under hfprune/
(so a new subpackage needs no edit) plus `hfprune.model_cards` and `hfprune.recipes`, which live at the top
of the repository (`model_cards/`, `recipes/`; mapped in pyproject.toml's [tool.setuptools.package-dir]).
"""

from setuptools import find_packages, setup


setup(packages=[*find_packages(include=["hfprune", "hfprune.*"]), "hfprune.model_cards", "hfprune.recipes"])

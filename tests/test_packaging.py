"""Packaging: what `import hfprune` promises, what the wheel carries, and what pyproject.toml declares.

The wheel is built from a copy of the sources with the setuptools backend directly (no pip, no network),
so the test takes seconds; the slow test installs that wheel into a fresh venv and runs the CLI from a
folder that has no recipes/.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import re
import shutil
import subprocess
import sys
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from packaging.requirements import Requirement

import hfprune
from hfprune.cli import main


ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PUBLIC = {
    "load_recipe": "hfprune.recipe.schema",
    "run": "hfprune.pipeline.runner",
    "get_pruner": "hfprune.pruners",
}
PUBLIC |= {"METHODS": "hfprune.pruners", "build_pruner": "hfprune.pruners"}
# Declared but not imported by hfprune/, and why.
NOT_IMPORTED = {
    "accelerate": "transformers.Trainer needs it",
    "jinja2": "huggingface_hub.ModelCard.from_template renders with it",
    "peft": "the recovery stage",
    "trl": "the recovery stage",
}


def _requirements(*extras: str) -> list[Requirement]:
    project = PYPROJECT["project"]
    lines = list(project["dependencies"])
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    return [r for r in map(Requirement, lines) if r.name != "hfprune"]


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_import_is_cheap_and_the_callbacks_do_not_pull_the_pipeline():
    probe = (
        "import sys, hfprune; heavy = {'torch', 'transformers', 'hfprune.pipeline.runner', 'hfprune.recipe.schema'}; "
        "print(sorted(heavy & set(sys.modules))); import hfprune.callbacks; "
        "print(sorted({'hfprune.pipeline.runner', 'hfprune.recipe.schema', 'hfprune.pruners'} & set(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.split("\n")[:2] == ["[]", "[]"], done.stdout + done.stderr


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_the_public_surface_is_importable_from_hfprune(name):
    module = importlib.import_module(PUBLIC[name])
    assert getattr(hfprune, name) is getattr(module, name)
    assert name in hfprune.__all__ and name in dir(hfprune)


def test_an_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'load_recipes'"):
        hfprune.load_recipes  # noqa: B018


def test_dependencies_are_ranges_and_constraints_pick_a_version_inside_each():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[_canonical(name)] = version.strip()
    for req in _requirements(*PYPROJECT["project"]["optional-dependencies"]):
        assert not any(s.operator in ("==", "===") for s in req.specifier), f"{req}: declare a range"
        assert _canonical(req.name) in pins, f"{req.name} is not pinned in constraints.txt"
        assert req.specifier.contains(pins[_canonical(req.name)]), (
            f"constraints.txt pins {req.name} outside {req}"
        )


def test_every_declared_dependency_is_imported_and_every_import_declared():
    imported = set()
    for path in (ROOT / "hfprune").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"hfprune", "__future__"}
    providers = importlib.metadata.packages_distributions()
    used = {_canonical(dist) for module in third_party for dist in providers.get(module, [module])}
    declared = {_canonical(r.name) for r in _requirements("gguf", "eval")}
    assert used - declared == set(), "imported by hfprune/ but not declared in pyproject.toml"
    assert declared - used - set(NOT_IMPORTED) == set(), "declared but imported nowhere: remove or explain"


def _build_wheel(tmp_path: Path) -> zipfile.ZipFile:
    """Build the wheel from a copy of what setuptools reads (the checkout stays free of build/)."""
    src, out = tmp_path / "src", tmp_path / "dist"
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("hfprune", "model_cards", "recipes"):
        shutil.copytree(ROOT / name, src / name, ignore=skip)
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    out.mkdir()
    build = f"from setuptools import build_meta; print(build_meta.build_wheel({str(out)!r}))"
    done = subprocess.run([sys.executable, "-c", build], cwd=src, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return zipfile.ZipFile(out / done.stdout.strip().splitlines()[-1])


def test_the_wheel_carries_templates_recipes_and_every_module(tmp_path):
    wheel = _build_wheel(tmp_path)
    names = set(wheel.namelist())
    expected = {f"hfprune/model_cards/{p.name}" for p in (ROOT / "model_cards").glob("*.md")}
    expected |= {f"hfprune/recipes/{p.name}" for p in (ROOT / "recipes").glob("*.yaml")}
    expected |= {f"hfprune/{p.relative_to(ROOT / 'hfprune')}" for p in (ROOT / "hfprune").rglob("*.py")}
    expected |= {f"hfprune/eval/tasks/{p.name}" for p in (ROOT / "hfprune" / "eval" / "tasks").glob("*.*l")}
    assert {"hfprune/model_cards/_sections.md", "hfprune/recipes/quickstart.yaml"} <= expected
    assert expected - names == set()
    assert not any(n.startswith(("model_cards/", "recipes/", "tests/")) for n in names)
    info = next(n for n in names if n.endswith(".dist-info/METADATA"))
    requires = [ln for ln in wheel.read(info).decode().splitlines() if ln.startswith("Requires-Dist:")]
    specifiers = [Requirement(ln.split(":", 1)[1]).specifier for ln in requires]
    assert specifiers and not any(s.operator == "==" for spec in specifiers for s in spec)
    entry_points = wheel.read(info.replace("METADATA", "entry_points.txt")).decode()
    assert "hfprune = hfprune.cli:main" in entry_points


def test_ls_and_validate_fall_back_to_the_shipped_recipes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    listed = CliRunner().invoke(main, ["ls"], catch_exceptions=False)
    assert listed.exit_code == 0
    assert "recipes (shipped with hfprune, " in listed.output and "quickstart.yaml" in listed.output
    checked = CliRunner().invoke(main, ["validate", "--no-files"], catch_exceptions=False)
    assert "recipes (shipped with hfprune, " in checked.output
    assert re.search(r"^ok +\S+/recipes/quickstart\.yaml", checked.output, re.MULTILINE), checked.output


def test_a_local_recipes_folder_wins_over_the_shipped_one(tmp_path, monkeypatch):
    (tmp_path / "recipes").mkdir()
    shutil.copy(ROOT / "recipes" / "wanda_0.5.yaml", tmp_path / "recipes" / "mine.yaml")
    monkeypatch.chdir(tmp_path)
    listed = CliRunner().invoke(main, ["ls"], catch_exceptions=False)
    assert "recipes (recipes/):" in listed.output
    assert "mine.yaml" in listed.output and "quickstart.yaml" not in listed.output


@pytest.mark.slow
def test_an_installed_wheel_lists_validates_and_renders_cards_from_anywhere(tmp_path, write_recipe):
    wheel = _build_wheel(tmp_path)
    env = tmp_path / "venv"
    venv.create(env, with_pip=True)
    bin_dir = env / "bin"
    # The dependencies come from this interpreter's site-packages (appended after the venv's own, so the
    # installed wheel, not the checkout, provides hfprune).
    site = next((env / "lib").glob("python*/site-packages"))
    here = [p for p in sys.path if p.endswith("site-packages")]
    (site / "zz_dependencies.pth").write_text("\n".join(here) + "\n")
    pip = [str(bin_dir / "python"), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index"]
    subprocess.run([*pip, wheel.filename], check=True)
    work = tmp_path / "elsewhere"
    work.mkdir()
    hfprune_bin = str(bin_dir / "hfprune")
    located = subprocess.run(
        [
            str(bin_dir / "python"),
            "-c",
            "import hfprune.publish.cards as c; print(c.template_path('pruned'))",
        ],
        cwd=work,
        capture_output=True,
        text=True,
        check=True,
    )
    assert str(site) in located.stdout and Path(located.stdout.strip()).is_file()
    listed = subprocess.run([hfprune_bin, "ls"], cwd=work, capture_output=True, text=True, check=True)
    assert f"shipped with hfprune, {site}" in listed.stdout and "quickstart.yaml" in listed.stdout
    checked = subprocess.run(
        [hfprune_bin, "validate", "--no-files"], cwd=work, capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    recipe = write_recipe()
    subprocess.run([hfprune_bin, "prune", str(recipe)], cwd=work, capture_output=True, check=True)
    card = tmp_path / "out" / "tiny" / "models" / "pruned" / "README.md"
    card.unlink(missing_ok=True)
    subprocess.run([hfprune_bin, "card", str(card.parents[2])], cwd=work, capture_output=True, check=True)
    assert "pruned by **shortgpt**" in card.read_text()

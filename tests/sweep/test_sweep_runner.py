"""`hfprune sweep`: grid expansion, --dry-run, --only, shared work between cells, skip on rerun, report."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import VOCAB_SIZE, tiny_model, tiny_recipe_yaml

from hfprune.cli import main
from hfprune.pipeline import providers
from hfprune.pruners import get_pruner
from hfprune.recipe.loading import RecipeError
from hfprune.recipe.schema import load_recipe
from hfprune.sweep.dry_run import describe_sweep
from hfprune.sweep.grid import SweepError, load_sweep
from hfprune.sweep.runner import run_sweep


TRAIN = """
train:
  seq_len: 32
  args: {per_device_train_batch_size: 4, save_steps: 100, learning_rate: 1.0e-3}
"""


@pytest.fixture
def write_sweep(tmp_path, tiny_parent_dir):
    """A sweep recipe on the tiny parent; `sweep` is the YAML of the sweep section."""

    def write(sweep: str, extra: str = TRAIN, name: str = "grid", every_tokens: int | None = None) -> Path:
        text = tiny_recipe_yaml(name, tmp_path / "out" / name, tiny_parent_dir, max_windows=4)
        if every_tokens:
            text += f"  every_tokens: {every_tokens}\n"
        path = tmp_path / f"{name}.yaml"
        path.write_text(
            text + textwrap.dedent(extra) + "sweep:\n" + textwrap.indent(textwrap.dedent(sweep), "  ")
        )
        return path

    return write


GRID = """
method: [shortgpt, minitron_depth, minitron_width, wanda]
ratio: [0.5, 0.75]
token_budget: [256, 512]
options:
  minitron_width: {alignment: 8}
"""


def test_dry_run_lists_every_cell_with_shape_params_and_budget(write_sweep, tmp_path):
    result = CliRunner().invoke(main, ["sweep", str(write_sweep(GRID)), "--dry-run"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    cells = {row["cell"]: row for row in plan["cells"]}
    assert len(cells) == 4 * 2 * 2
    assert set(cells) >= {"shortgpt-r0.5-t256", "wanda-r0.75-t512", "minitron_width-r0.5-t256"}
    depth = cells["shortgpt-r0.5-t256"]
    assert depth["target_shape"] == {"num_hidden_layers": 4} and depth["status"] == "to run"
    assert depth["params"]["pruned"]["non_embedding"] < depth["params"]["parent"]["non_embedding"]
    assert cells["minitron_width-r0.5-t256"]["target_shape"]["hidden_size"] % 8 == 0
    assert cells["wanda-r0.5-t256"]["target_shape"] == {}  # sparse keeps the parent's shape
    # Both depth methods keep 4 of 8 layers at 0.5: one scratch twin serves both at each budget.
    assert depth["scratch_shared_with"] == ["minitron_depth-r0.5-t256"]
    assert cells["wanda-r0.5-t256"]["scratch_shared_with"] == []
    assert cells["shortgpt-r0.5-t256"]["budget"] == "smallest budget of the sweep"
    assert "trains from the start" in cells["shortgpt-r0.5-t512"]["budget"]
    assert "| shortgpt-r0.5-t256 | to run | num_hidden_layers=4 |" in result.stderr
    assert not (tmp_path / "out").exists()  # a plan touches nothing


def test_only_selects_cells_and_rejects_values_outside_the_grid(write_sweep):
    grid = load_sweep(write_sweep(GRID))
    picked = grid.select(["method=wanda,ratio=0.5", "method=shortgpt,budget=512"])
    assert [c.id for c in picked] == [
        "shortgpt-r0.5-t512",
        "shortgpt-r0.75-t512",
        "wanda-r0.5-t256",
        "wanda-r0.5-t512",
    ]
    with pytest.raises(
        SweepError, match=r"method 'sparsegpt' is not in this sweep \(it has: shortgpt, minitron_depth"
    ):
        grid.select(["method=sparsegpt"])
    with pytest.raises(SweepError, match="keys method, ratio, budget"):
        grid.select(["colour=red"])
    result = CliRunner().invoke(main, ["sweep", str(write_sweep(GRID)), "--only", "ratio=0.6", "--dry-run"])
    assert result.exit_code == 2 and "ratio '0.6' is not in this sweep (it has: 0.5, 0.75)" in result.stderr


@pytest.mark.parametrize(
    ("sweep", "extra", "problem"),
    [
        (
            "ratio: [0.5]\nmethod: [shortgpt]\n",
            "prune: {ratio: 0.5}\n" + TRAIN,
            "prune.ratio: also given as sweep.ratio",
        ),
        ("ratio: [0.5]\nmethod: [shortgtp]\n", TRAIN, "did you mean 'shortgpt'"),
        (
            "ratio: [0.5]\nmethod: [shortgpt]\ntoken_budget: [256]\n",
            "",
            "sweep.token_budget: needs a train section",
        ),
        (
            "ratio: [0.5]\nmethod: [shortgpt]\noptions: {flap: {}}\n",
            TRAIN,
            "sweep.options.flap: not a method of",
        ),
        ("ratio: [0.5, 0.5]\nmethod: [shortgpt]\n", TRAIN, "each value may appear once"),
        (
            "ratio: [1.5]\nmethod: [shortgpt]\n",
            TRAIN,
            "prune.ratio: Input should be less than 1 (cells: shortgpt-r1.5)",
        ),
        ("method: [shortgpt]\n", TRAIN, "sweep.ratio: give a list here, or a single prune.ratio"),
    ],
)
def test_invalid_sweeps_name_the_problem(write_sweep, sweep, extra, problem):
    with pytest.raises(RecipeError) as err:
        load_sweep(write_sweep(sweep, extra=extra))
    assert problem in str(err.value)


def test_run_refuses_a_sweep_recipe(write_sweep):
    path = write_sweep(GRID)
    with pytest.raises(RecipeError, match="run it with `hfprune sweep`"):
        load_recipe(path)
    result = CliRunner().invoke(main, ["run", str(path)])
    assert result.exit_code == 2 and "hfprune sweep" in result.stderr


WIDE_HEADS = {"num_attention_heads": 8, "num_key_value_heads": 8, "intermediate_size": 256}


@pytest.mark.parametrize(
    ("method", "options", "shape"),
    [
        ("shortgpt", {}, {}),
        ("minitron_depth", {}, {}),
        ("minitron_width", {"alignment": 8}, {}),
        ("flap", {}, WIDE_HEADS),  # 8 groups: FLAP reaches 0.5 and 0.75 with legal head counts
    ],
)
def test_scores_shared_by_ratios_prune_exactly_like_separate_runs(method, options, shape):
    pruner_cls = get_pruner(method)
    pruner = pruner_cls(pruner_cls.Options(**options))
    calibration = torch.randint(2, VOCAB_SIZE, (4, 32), generator=torch.Generator().manual_seed(0))
    ratios = [0.5, 0.75]
    shared = pruner.score_for_ratios(tiny_model(**shape), calibration, ratios)
    for ratio in ratios:
        alone = pruner.prune(tiny_model(**shape), calibration, ratio).model.state_dict()
        from_shared = pruner.apply(tiny_model(**shape), shared, ratio).model.state_dict()
        assert alone.keys() == from_shared.keys()
        assert all(torch.equal(alone[k], from_shared[k]) for k in alone)


def test_sequential_sparse_scores_are_not_shared():
    calibration = torch.randint(2, VOCAB_SIZE, (2, 16))
    assert get_pruner("wanda")().score_for_ratios(tiny_model(), calibration, [0.5, 0.7]) is None
    assert get_pruner("magnitude")().score_for_ratios(tiny_model(), None, [0.5, 0.7]) is not None


def _inode(path: Path) -> int:
    return os.stat(path).st_ino


def test_sweep_shares_work_skips_finished_cells_and_reports(write_sweep, monkeypatch):
    path = write_sweep(
        """
        method: [shortgpt, minitron_depth]
        ratio: [0.5]
        token_budget: [256, 512]
        """,
        every_tokens=128,
    )
    grid = load_sweep(path)
    loads = []
    real_load = providers.load_parent
    monkeypatch.setattr(providers, "load_parent", lambda spec: loads.append(1) or real_load(spec))
    summary = run_sweep(grid)
    # One load per prune, none per cell: a prune takes the parent in place and the next one reloads it
    # (two methods; the other budgets share their pruned model), and no copy of the parent is made.
    assert len(loads) == 2
    assert summary.ran == [c.id for c in grid.cells] and summary.up_to_date == []
    out = grid.output_path
    metrics = {c.id: json.loads((out / c.id / "metrics.json").read_text()) for c in grid.cells}

    # Pruned once per method and ratio: the larger budget's cell hard-links the smaller's checkpoint.
    for method in ("shortgpt", "minitron_depth"):
        small, large = (out / f"{method}-r0.5-t{b}" / "models/pruned/model.safetensors" for b in (256, 512))
        assert _inode(small) == _inode(large)
    # Both depth methods keep 4 of 8 layers: one scratch twin per budget, trained once.
    for budget in (256, 512):
        donor, taker = f"shortgpt-r0.5-t{budget}", f"minitron_depth-r0.5-t{budget}"
        assert metrics[taker]["scratch"]["shared_from"] == donor
        assert "shared_from" not in metrics[donor]["scratch"]
        assert _inode(out / donor / "models/scratch/model.safetensors") == _inode(
            out / taker / "models/scratch/model.safetensors"
        )
        assert metrics[taker]["scratch"]["tokens_trained"] == metrics[donor]["scratch"]["tokens_trained"]
    for cell, entry in metrics.items():
        budget = int(cell.rsplit("-t", 1)[1])
        for run in ("continued", "scratch"):
            assert budget <= entry[run]["tokens_trained"] < budget + 4 * 32
            assert entry[run]["curve"][0]["tokens"] == 0
        assert entry["parent"] == metrics["shortgpt-r0.5-t256"]["parent"]
    # The continued models differ by method (different layers kept); the pruned model is the same per method.
    assert metrics["shortgpt-r0.5-t256"]["pruned"] == metrics["shortgpt-r0.5-t512"]["pruned"]

    # The report covers the grid, and every model card shows its plots (copied beside the weights).
    report = (out / "report.md").read_text()
    assert "## 256 training tokens" in report and "## 512 training tokens" in report
    assert {"curves.png", "gap_vs_budget.png"} <= set(json.loads((out / "report.json").read_text())["plots"])
    card_folder = out / "minitron_depth-r0.5-t512" / "models" / "continued"
    assert "![curves.png](curves.png)" in (card_folder / "README.md").read_text()
    assert (card_folder / "curves.png").read_bytes() == (out / "curves.png").read_bytes()

    # A rerun finds every cell finished and loads no weights at all.
    monkeypatch.setattr(providers, "load_parent", lambda spec: pytest.fail("weights loaded on rerun"))
    again = run_sweep(load_sweep(path))
    assert again.ran == [] and len(again.up_to_date) == 4
    plan = describe_sweep(load_sweep(path))
    assert {row["status"] for row in plan["cells"]} == {"finished"}


def test_only_runs_one_cell_of_a_prune_only_sweep(write_sweep):
    path = write_sweep("method: [shortgpt, magnitude]\nratio: [0.5, 0.75]\n", extra="")
    result = CliRunner().invoke(main, ["sweep", str(path), "--only", "method=magnitude,ratio=0.75"])
    assert result.exit_code == 0, result.output
    out = load_sweep(path).output_path
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["magnitude-r0.75"]
    cell_metrics = json.loads((out / "magnitude-r0.75" / "metrics.json").read_text())
    assert set(cell_metrics) == {"parent", "pruned"}
    assert "| magnitude | 0.75" in result.stdout  # the report printed at the end
    recipe = load_recipe(out / "magnitude-r0.75" / "recipe.yaml")  # each cell is an ordinary recipe
    assert (recipe.prune.method, recipe.prune.ratio, recipe.name) == (
        "magnitude",
        0.75,
        "grid-magnitude-r0.75",
    )


def test_a_sweep_cell_prunes_and_scores_exactly_like_the_same_recipe_run_alone(write_sweep, tmp_path):
    """One execution path: a cell (shared parent, calibration and scores) and a single run of its recipe
    give the same pruned weights and the same metrics."""
    from safetensors.torch import load_file

    from hfprune.pipeline import runner as pipeline

    path = write_sweep(
        "method: [minitron_width]\nratio: [0.5, 0.75]\noptions: {minitron_width: {alignment: 8}}\n", ""
    )
    grid = load_sweep(path)
    run_sweep(grid)
    cell = grid.output_path / "minitron_width-r0.75"
    alone = pipeline.run(load_recipe(cell / "recipe.yaml", [f"output_dir={tmp_path / 'alone'}"]))
    shared, single = (load_file(d / "models/pruned/model.safetensors") for d in (cell, alone.output_dir))
    assert shared.keys() == single.keys() and all(torch.equal(shared[k], single[k]) for k in shared)
    cell_report = json.loads((cell / "models/pruned/prune_report.json").read_text())
    assert cell_report["scores_shared_across_ratios"] is True
    assert json.loads((cell / "metrics.json").read_text()) == alone.metrics

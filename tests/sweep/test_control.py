"""The sweep's control (`sweep.control`): the parent's shape trained from scratch on the parent's
pretraining tokens, one per seed. The grid and dry run list it; the report sets it beside the parent,
and a control that disagrees heads the report and leaves every claim not judged. Synthetic sweeps for
the report; one tiny pretrained parent for the control's own training."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from test_seed_noise import entry, parent_offset, replicated, window_nll, write_sweep_file

from hfprune.cli import main
from hfprune.recipe.loading import RecipeError
from hfprune.report.control import AGREES, DISAGREES
from hfprune.report.findings import NOT_JUDGED
from hfprune.report.writer import write_report
from hfprune.seeds import Role, role_seed
from hfprune.sweep.control import RECORD, control_status, run_control
from hfprune.sweep.grid import load_sweep


def study_with_controls(root, offsets: list[float]) -> None:
    """A replicated study (3 seeds) and a control per seed, `offsets[seed]` nats above its parent."""
    for method, s2 in (("wanda", 0.1), ("shortgpt", -0.3)):
        replicated(root, method, 0.5, 1_000, [0.49, 0.5, 0.51], s2 - 0.2)
        replicated(root, method, 0.5, 100_000, [0.19, 0.2, 0.21], s2)
    for seed, offset in enumerate(offsets):
        folder = root / f"control-s{seed}"
        folder.mkdir()
        record = {
            "seed": seed,
            "init_seed": role_seed(seed, Role.CONTROL_INIT),
            "tokens_trained": 1_000_000,
            "perplexity": {"heldout": entry(window_nll(parent_offset(seed) + offset, 100 + seed))},
        }
        (folder / RECORD).write_text(json.dumps(record))


def test_a_control_that_agrees_with_its_parent_is_shown_beside_it(tmp_path):
    study_with_controls(tmp_path, [0.01, -0.02, 0.015])
    data = write_report(tmp_path)
    control = data["study"]["control"]
    assert control["status"] == AGREES and [row["seed"] for row in control["per_seed"]] == [0, 1, 2]
    assert control["gap"]["gap"] == pytest.approx(0.0017, abs=0.003) and control["gap"]["seed_se"] > 0
    assert all(row["parent_perplexity"] and row["control_perplexity"] for row in control["per_seed"])
    assert {f["verdict"] for f in data["study"]["findings"]} != {NOT_JUDGED}
    text = (tmp_path / "report.md").read_text()
    assert "## Control" in text and "| 0 |" in text and "the control agrees with the parent" in text
    assert "The control disagrees" not in text


def test_a_control_that_disagrees_heads_the_report_and_no_claim_is_judged(tmp_path):
    study_with_controls(tmp_path, [0.5, 0.45, 0.55])
    data = write_report(tmp_path)
    assert data["study"]["control"]["status"] == DISAGREES
    assert {f["verdict"] for f in data["study"]["findings"]} == {NOT_JUDGED}
    assert all("the control disagrees" in f["numbers"] for f in data["study"]["findings"])
    lines = (tmp_path / "report.md").read_text().splitlines()
    assert lines[0] == "# hfprune report" and lines[2].startswith("**The control disagrees with the parent")
    assert "**not judged**" in "\n".join(lines)


def test_a_sweep_without_a_control_says_so(tmp_path):
    study_with_controls(tmp_path, [])
    data = write_report(tmp_path)
    assert data["study"]["control"] is None
    assert "This sweep has no control" in (tmp_path / "report.md").read_text()


def test_the_grid_and_dry_run_list_a_control_per_seed(tmp_path):
    path = write_sweep_file(tmp_path, "seed: [0, 1, 2]\nreplicate_methods: [wanda]\ncontrol: true\n")
    grid = load_sweep(path)
    assert [(c.id, c.seed) for c in grid.controls] == [
        ("control-s0", 0),
        ("control-s1", 1),
        ("control-s2", 2),
    ]
    assert grid.controls[1].recipe.parent.model.endswith("parent-seed1")
    result = CliRunner().invoke(main, ["sweep", str(path), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "Controls (sweep.control)" in result.output
    assert f"| control-s1 | 1 | {role_seed(1, Role.CONTROL_INIT)} |" in result.output
    plan = json.loads(result.stdout[result.stdout.index("{") :])
    assert [c["token_budget"] for c in plan["controls"]] == [512] * 3  # P: the parent's pretraining tokens
    assert {c["status"] for c in plan["controls"]} == {"to run"}
    single = load_sweep(write_sweep_file(tmp_path, "control: true\n"))
    assert [c.id for c in single.controls] == ["control"]


def test_a_control_needs_a_pretrained_parent(tmp_path):
    path = write_sweep_file(tmp_path, "control: true\n")
    path.write_text(path.read_text().replace("parent:\n", f"parent:\n  model: {tmp_path}\n", 1))
    with pytest.raises(RecipeError) as err:
        load_sweep(path)
    assert "sweep.control" in str(err.value)


def test_the_control_trains_the_parents_shape_on_its_tokens_from_another_init(tmp_path):
    grid = load_sweep(write_sweep_file(tmp_path, "control: true\n"))
    control = grid.controls[0]
    record = run_control(control)
    assert record["tokens_trained"] == 512 and record["init_seed"] == role_seed(0, Role.CONTROL_INIT)
    assert record["init_seed"] != role_seed(0, Role.PARENT_INIT)
    assert record["perplexity"]["pydoc"]["value"] > 1 and record["perplexity"]["pydoc"]["window_nll"]
    parent = json.loads((tmp_path / "out" / "models" / "parent" / "config.json").read_text())
    made = json.loads((control.output_path / "model" / "config.json").read_text())
    assert made["num_hidden_layers"] == parent["num_hidden_layers"] == 2
    assert made["hidden_size"] == parent["hidden_size"]
    assert control_status(control) == "finished"
    assert run_control(control) == record  # up to date: left as it is

"""`hfprune report`: tables per budget with the gap, plots, from the output contract alone."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from hfprune.report.reader import find_runs
from hfprune.report.writer import write_report


PROTOCOL = {
    "seq_len": 256,
    "windows": 8,
    "tokens": 2040,
    "bos": True,
    "dataset": {"data_files": "test.jsonl"},
}


def fake_run(root: Path, name: str, method: str, ratio: float, budget: int, continued: float, scratch: float):
    folder = root / name
    (folder / "models" / "pruned").mkdir(parents=True)
    recipe = {
        "name": name,
        "prune": {"method": method, "ratio": ratio},
        "eval": {"perplexity": [{"name": "hamlet"}]},
        "train": {"token_budget": budget},
    }
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    curve = [{"tokens": t, "perplexity": continued * (2 - t / budget)} for t in (budget // 2, budget)]
    metrics = {
        "parent": {"perplexity": {"hamlet": {"value": 20.0, "protocol": PROTOCOL}}},
        "pruned": {"perplexity": {"hamlet": {"value": 500.0}}},
        "continued": {
            "perplexity": {"hamlet": {"value": continued}},
            "tokens_trained": budget,
            "curve": curve,
        },
        "scratch": {"perplexity": {"hamlet": {"value": scratch}}, "tokens_trained": budget, "curve": curve},
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))
    params = {"total": 80_000_000, "non_embedding": 60_000_000}
    report = {"granularity": "depth", "ratio_achieved": ratio, "params_after": params}
    (folder / "models" / "pruned" / "prune_report.json").write_text(json.dumps(report))
    return folder


def test_report_over_a_grid(tmp_path):
    fake_run(tmp_path, "a", "shortgpt", 0.5, 1000, continued=40.0, scratch=90.0)
    fake_run(tmp_path, "b", "shortgpt", 0.8, 1000, continued=95.0, scratch=90.0)
    fake_run(tmp_path, "c", "shortgpt", 0.5, 4000, continued=30.0, scratch=45.0)
    assert len(find_runs(tmp_path)) == 3
    data = write_report(tmp_path)
    gaps = {(r["ratio"], r["budget"]): r["gap"] for r in data["rows"]}
    assert gaps == {(0.5, 1000): -50.0, (0.8, 1000): 5.0, (0.5, 4000): -15.0}
    text = (tmp_path / "report.md").read_text()
    assert "## 1,000 training tokens" in text and "## 4,000 training tokens" in text
    assert "**5.00 (scratch wins)**" in text and "80.0M (60.0M)" in text
    # Finding 1 per budget: wins counted, median perplexity ratio and gap.
    assert "| 1,000 | 2 | 1 of 2 | 1.6x | -22.50 |" in text
    assert "| 4,000 | 1 | 1 of 1 | 1.5x | -15.00 |" in text
    assert "`test.jsonl`: 8 windows of 256 tokens (2040 scored tokens), BOS prepended" in text
    for plot in ("curves.png", "gap_vs_ratio.png", "gap_vs_budget.png"):
        assert (tmp_path / plot).read_bytes()[:4] == b"\x89PNG"
        assert f"]({plot})" in text


def test_report_of_a_single_run_without_training(tmp_path):
    folder = fake_run(tmp_path, "solo", "shortgpt", 0.5, 1000, continued=40.0, scratch=90.0)
    data = write_report(folder)
    assert [r["run"] for r in data["rows"]] == ["solo"]
    assert data["plots"] == ["curves.png"]  # one ratio and one budget: no trend to plot


def test_report_command(tmp_path):
    from click.testing import CliRunner

    from hfprune.cli import main

    fake_run(tmp_path, "a", "shortgpt", 0.5, 1000, continued=40.0, scratch=90.0)
    result = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert result.exit_code == 0 and "1 run(s)" in result.output
    assert (tmp_path / "report.md").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert CliRunner().invoke(main, ["report", str(empty)]).exit_code == 1

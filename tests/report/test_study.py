"""The study part of `hfprune report` (Figure 1, one verdict per claim of the paper, error bars) on
synthetic sweeps whose answers are known, and the per-window NLLs the evaluation records for it."""

from __future__ import annotations

import json
import math
import random
import statistics
import zlib
from pathlib import Path

import pytest
import torch
import yaml

from hfprune.report.findings import MIXED, NOT_TESTABLE, REFUTED, SUPPORTED
from hfprune.report.writer import write_report


WINDOWS = 40
PRETRAINED = 1_000_000
GRANULARITY = {"wanda": "sparse", "shortgpt": "depth", "minitron_width": "width"}


def window_nll(offset: float, seed: int) -> list[float]:
    """Per-window NLLs: a text difficulty shared by every model (so it cancels in a paired difference),
    the model's offset, and a little noise of its own (sd 0.01)."""
    noise = random.Random(seed)
    return [round(3 + 0.5 * math.sin(i) + offset + noise.gauss(0, 0.01), 6) for i in range(WINDOWS)]


def entry(windows: list[float]) -> dict:
    nll = sum(windows) / len(windows)
    protocol = {"nll": nll, "seq_len": 64, "windows": len(windows), "tokens": 63 * len(windows), "bos": True}
    se = statistics.stdev(windows) / math.sqrt(len(windows))
    return {"value": math.exp(nll), "protocol": protocol, "nll_se": se, "window_nll": windows}


def study_cell(root: Path, method: str, ratio: float, budget: int, gaps: tuple[float | None, float | None]):
    """A grid point replicated over 3 seeds (verdicts are judged against seed noise); the seed-0 folder."""
    folders = [
        seed_cell(
            root,
            method,
            ratio,
            budget,
            seed,
            tuple(None if g is None else g + 0.005 * (seed - 1) for g in gaps),
        )
        for seed in range(3)
    ]
    return folders[0]


def seed_cell(root: Path, method: str, ratio: float, budget: int, seed: int, gaps: tuple):
    """A sweep cell: continued at NLL offset 0, scratch `gaps[0]` above it (setting 1), scratch_pipeline
    `gaps[1]` above it (setting 2); None leaves that twin out."""
    folder = root / f"{method}_{ratio}_{budget}_s{seed}"
    (folder / "models" / "pruned").mkdir(parents=True)
    recipe = {
        "name": folder.name,
        "seed": seed,
        "parent": {"model": "parent", "pretrained_tokens": PRETRAINED},
        "prune": {"method": method, "ratio": ratio},
        "eval": {"perplexity": [{"name": "heldout"}]},
        "train": {"token_budget": budget},
    }
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    seed = zlib.crc32(folder.name.encode()) % 10_000  # stable across processes, unlike hash()
    metrics = {
        "parent": {"perplexity": {"heldout": entry(window_nll(-1.0, 1))}, "pretrained_tokens": PRETRAINED},
        "pruned": {"perplexity": {"heldout": entry(window_nll(3.0, seed + 1))}},
        "continued": {
            "perplexity": {"heldout": entry(window_nll(0.0, seed + 2))},
            "tokens_trained": budget,
            "setting": 1,
        },
    }
    for kind, gap, setting, tokens in (
        ("scratch", gaps[0], 1, budget),
        ("scratch_pipeline", gaps[1], 2, PRETRAINED + budget),
    ):
        if gap is not None:
            windows = window_nll(gap, seed + 3 + setting)
            metrics[kind] = {
                "perplexity": {"heldout": entry(windows)},
                "tokens_trained": tokens,
                "setting": setting,
            }
    (folder / "metrics.json").write_text(json.dumps(metrics))
    report = {"granularity": GRANULARITY[method], "ratio_achieved": ratio, "params_after": {"total": 1000}}
    (folder / "models" / "pruned" / "prune_report.json").write_text(json.dumps(report))
    return folder


def verdicts(data: dict) -> dict[int, str]:
    return {f["claim"]: f["verdict"] for f in data["study"]["findings"]}


def test_a_sweep_that_agrees_with_the_paper_except_the_vanishing(tmp_path):
    s1 = {
        ("wanda", 0.5): (0.5, 0.2),
        ("wanda", 0.8): (0.1, 0.05),
        ("shortgpt", 0.5): (0.4, 0.15),
        ("shortgpt", 0.8): (0.08, 0.04),
    }
    for (method, ratio), (small, large) in s1.items():
        s2 = 0.1 if method == "wanda" else -0.3
        study_cell(tmp_path, method, ratio, 1_000, (small, s2 - 0.2))
        study_cell(tmp_path, method, ratio, 100_000, (large, s2))
    (tmp_path / "discussion.md").write_text("The depth twins caught up because the corpus is small.\n")
    data = write_report(tmp_path)
    # Claim 3 narrows everywhere but the highest ratio keeps a gap beyond noise: mixed, not supported.
    assert verdicts(data) == {1: SUPPORTED, 2: SUPPORTED, 3: MIXED, 4: SUPPORTED}
    findings = {f["claim"]: f for f in data["study"]["findings"]}
    assert findings[1]["numbers"].startswith("gap > 1.96 seed se in 8 of 8")
    gaps = [d["gap"] for d in findings[1]["details"]]
    assert min(gaps) == pytest.approx(0.04, abs=0.01) and max(gaps) == pytest.approx(0.5, abs=0.01)
    assert f"gaps {min(gaps):+.3f} to {max(gaps):+.3f} nats" in findings[1]["numbers"]
    assert "narrows beyond seed noise in 4 of 4 method × ratio lines" in findings[2]["numbers"]
    assert {(d["method"], d["gap"] > 0) for d in findings[4]["details"]} == {
        ("wanda", True),
        ("shortgpt", False),
    }
    assert {d["budget"] for d in findings[4]["details"]} == {100_000}  # the largest budget only

    text = (tmp_path / "report.md").read_text()
    assert (
        "| 1 | 1 | same budget: the pruned init beats the random init |" in text and "**supported**" in text
    )
    assert text.rstrip().endswith("## Discussion\n\nThe depth twins caught up because the corpus is small.")
    assert "![Figure 1" in text and "figure1.png" in data["plots"]
    png = (tmp_path / "figure1.png").read_bytes()
    assert png[:4] == b"\x89PNG"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width > 2 * height  # two panels side by side
    panels = data["study"]["figure"]["panels"]
    assert [(p["setting"], p["lines"]) for p in panels] == [(1, 4), (2, 4)]
    # The perplexity table gives every model a 95% interval; the cell table the twins' token budgets.
    assert f"{PRETRAINED + 100_000:,}" in text and "| wanda | 0.5 | 100,000 |" in text
    assert data["study"]["discussion"].startswith("The depth twins")


def test_the_gap_error_is_paired_per_window(tmp_path):
    folder = study_cell(tmp_path, "wanda", 0.5, 1_000, (0.2, 0.1))
    study_cell(tmp_path, "wanda", 0.5, 10_000, (0.1, 0.05))
    data = write_report(tmp_path)
    metrics = json.loads((folder / "metrics.json").read_text())
    scratch = metrics["scratch"]["perplexity"]["heldout"]["window_nll"]
    continued = metrics["continued"]["perplexity"]["heldout"]["window_nll"]
    differences = [s - c for s, c in zip(scratch, continued, strict=True)]
    cell = next(c for c in data["study"]["cells"] if c["budget"] == 1_000)
    assert cell["setting_1"]["gap"] == pytest.approx(statistics.mean(differences), abs=1e-6)
    assert cell["setting_1"]["se"] == pytest.approx(
        statistics.stdev(differences) / math.sqrt(WINDOWS), abs=1e-6
    )
    # The text difficulty shared by both models cancels: the paired se is far below the unpaired one.
    unpaired = math.hypot(*(statistics.stdev(w) / math.sqrt(WINDOWS) for w in (scratch, continued)))
    assert cell["setting_1"]["se"] < unpaired / 10
    assert cell["setting_2"]["gap"] == pytest.approx(0.1, abs=0.01)


def test_a_sweep_that_refutes_the_paper(tmp_path):
    for method in ("wanda", "shortgpt"):
        for ratio in (0.5, 0.8):
            for budget, gap in ((1_000, -0.1), (100_000, -0.3)):
                s2 = -0.2 if method == "wanda" else 0.3
                study_cell(tmp_path, method, ratio, budget, (gap, s2))
    assert verdicts(write_report(tmp_path)) == {1: REFUTED, 2: REFUTED, 3: REFUTED, 4: REFUTED}


def test_a_vanishing_gap_at_the_highest_ratio(tmp_path):
    for method in ("wanda", "shortgpt"):
        for budget, low in ((1_000, 0.5), (100_000, 0.2)):
            study_cell(tmp_path, method, 0.5, budget, (low, 0.1))
            study_cell(tmp_path, method, 0.8, budget, (0.0, 0.1))
    findings = {f["claim"]: f for f in write_report(tmp_path)["study"]["findings"]}
    # Claim 3 holds exactly; claims 1 and 2 then hold only at ratio 0.5 (no advantage left at 0.8).
    assert findings[3]["verdict"] == SUPPORTED and all(d["vanished"] for d in findings[3]["details"])
    assert findings[1]["verdict"] == MIXED and findings[2]["verdict"] == MIXED
    # Every method has an advantage in setting 2, so depth's is not matched: the contrast fails for it.
    assert findings[4]["verdict"] == MIXED


def test_claims_without_the_cells_they_need_are_not_testable(tmp_path):
    study_cell(tmp_path, "wanda", 0.5, 1_000, (0.2, 0.1))
    study_cell(tmp_path, "minitron_width", 0.5, 1_000, (0.2, -0.1))
    findings = {f["claim"]: f for f in write_report(tmp_path)["study"]["findings"]}
    assert findings[2]["verdict"] == NOT_TESTABLE and findings[3]["verdict"] == NOT_TESTABLE
    assert findings[4]["verdict"] == NOT_TESTABLE and "needs both sparse and depth" in findings[4]["numbers"]
    assert findings[1]["verdict"] == SUPPORTED


def test_a_sweep_without_the_pipeline_twin_gets_the_ordinary_report(tmp_path):
    study_cell(tmp_path, "wanda", 0.5, 1_000, (0.2, None))
    study_cell(tmp_path, "wanda", 0.5, 10_000, (0.1, None))
    data = write_report(tmp_path)
    assert "study" not in data and not (tmp_path / "figure1.png").exists()
    assert "## The paper's claims" not in (tmp_path / "report.md").read_text()


def test_perplexity_keeps_each_windows_nll_and_its_standard_error(tiny_tokenizer):
    from conftest import tiny_model

    from hfprune.data.texts import windows
    from hfprune.eval.perplexity import perplexity

    model = tiny_model(num_hidden_layers=2)
    ids = torch.randint(2, 384, (7 * 31,), generator=torch.Generator().manual_seed(0)).tolist()
    batch = windows(ids, 32, bos=0)
    result = perplexity(model, batch, True, {"path": "x"}, batch_size=3)  # 3 + 3 + 1: a ragged last batch
    assert len(result.window_nll) == 7 and result.tokens == 7 * 31
    # Every window scores the same number of tokens: the token-weighted mean is the plain mean.
    assert math.exp(statistics.mean(result.window_nll)) == pytest.approx(result.value, rel=1e-6)
    with torch.no_grad():
        for i in (0, 6):
            loss = model(input_ids=batch[i : i + 1], labels=batch[i : i + 1]).loss.item()
            assert result.window_nll[i] == pytest.approx(loss, abs=1e-5)
    assert result.nll_se == pytest.approx(statistics.stdev(result.window_nll) / math.sqrt(7), rel=1e-4)
    recorded = result.to_dict()
    assert list(recorded)[:2] == ["value", "protocol"] and "window_nll" not in recorded["protocol"]
    low, high = recorded["interval_95"]
    assert low < recorded["value"] < high
    assert math.log(high) - math.log(recorded["value"]) == pytest.approx(1.96 * result.nll_se)


def test_the_report_says_how_each_model_trained(tmp_path):
    folder = seed_cell(tmp_path, "wanda", 0.5, 1_000, 0, (0.5, 0.2))
    wsd = {"type": "wsd", "decay_ratio": 0.2}
    recipe = yaml.safe_load((folder / "recipe.yaml").read_text())
    recipe["parent"]["pretrain"] = {"schedule": wsd, "args": {"learning_rate": 0.001}}
    recipe["train"] |= {
        "runs": ["continued", "scratch", "scratch_pipeline"],
        "schedule": wsd,
        "args": {"learning_rate": 0.002},
    }
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    metrics = json.loads((folder / "metrics.json").read_text())
    metrics["parent"]["pretraining"] = {"tokens_per_step": 1024, "data_order": "full permutation per seed"}
    metrics["continued"]["training"] = {"tokens_per_step": 512, "data_order": "full permutation per seed"}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    for seed in (1, 2):
        seed_cell(tmp_path, "wanda", 0.5, 1_000, seed, (0.5, 0.2))
    regimes = write_report(tmp_path)["study"]["training"]
    assert [r["models"] for r in regimes] == [
        "parent (pretraining)",
        "continued, scratch, scratch_pipeline, control",
    ]
    assert [(r["schedule"]["type"], r["learning_rate"], r["tokens_per_step"]) for r in regimes] == [
        ("wsd", 0.001, 1024),
        ("wsd", 0.002, 512),
    ]
    lines = (tmp_path / "report.md").read_text().splitlines()
    row = next(line for line in lines if line.startswith("| parent (pretraining)"))
    assert "type wsd" in row and "| 0.001 | 1024 | full permutation per seed |" in row

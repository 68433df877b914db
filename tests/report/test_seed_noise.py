"""Training noise (`hfprune.report.seed_noise`): a sweep's seed replicates (`sweep.seed`), the seed noise
of each gap and of each kind per budget, verdicts judged against it (borrowed by cells without
replicates, none below 3 replicates), one verdict per claim, and the seed replicates in the grid and
its dry run. Synthetic sweeps with known answers; the dry run on a tiny pretrained-parent recipe."""

from __future__ import annotations

import json
import math
import random
import statistics
import textwrap
import zlib
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from hfprune.cli import main
from hfprune.recipe.loading import RecipeError
from hfprune.report.cells import Gap
from hfprune.report.findings import NO_SEED_NOISE, NOT_JUDGED, SUPPORTED
from hfprune.report.seed_noise import BORROWED, MEASURED, SeedGap
from hfprune.report.writer import write_report
from hfprune.sweep.grid import load_sweep


WINDOWS = 40
PRETRAINED = 1_000_000
GRANULARITY = {"wanda": "sparse", "shortgpt": "depth", "minitron_width": "width"}


def window_nll(offset: float, seed: int) -> list[float]:
    """Per-window NLLs: a difficulty shared by every model (cancels when paired), the model's offset and
    a little noise of its own (sd 0.01)."""
    noise = random.Random(seed)
    return [round(3 + 0.5 * math.sin(i) + offset + noise.gauss(0, 0.01), 6) for i in range(WINDOWS)]


def entry(windows: list[float]) -> dict:
    nll = sum(windows) / len(windows)
    protocol = {"nll": nll, "seq_len": 64, "windows": len(windows), "tokens": 63 * len(windows), "bos": True}
    se = statistics.stdev(windows) / math.sqrt(len(windows))
    return {"value": math.exp(nll), "protocol": protocol, "nll_se": se, "window_nll": windows}


def cell(root: Path, method: str, ratio: float, budget: int, seed: int, gap1: float, gap2: float) -> Path:
    """One seed replicate of a grid point: continued at NLL offset 0, scratch `gap1` above it, the
    pipeline twin `gap2` above it; the parent at -1 plus a seed's own shift."""
    folder = root / f"{method}-r{ratio}-t{budget}-s{seed}"
    (folder / "models" / "pruned").mkdir(parents=True)
    recipe = {
        "name": folder.name,
        "seed": seed,
        "parent": {"model": f"parent-seed{seed}", "pretrained_tokens": PRETRAINED},
        "prune": {"method": method, "ratio": ratio},
        "eval": {"perplexity": [{"name": "heldout"}]},
        "train": {"token_budget": budget},
    }
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    base = zlib.crc32(folder.name.encode()) % 10_000
    metrics = {
        "parent": {"perplexity": {"heldout": entry(window_nll(parent_offset(seed), 7 + seed))}},
        "pruned": {"perplexity": {"heldout": entry(window_nll(3.0, base + 1))}},
        "continued": {"perplexity": {"heldout": entry(window_nll(0.0, base + 2))}, "setting": 1},
        "scratch": {"perplexity": {"heldout": entry(window_nll(gap1, base + 3))}, "setting": 1},
        "scratch_pipeline": {
            "perplexity": {"heldout": entry(window_nll(gap2, base + 4))},
            "setting": 2,
            "tokens_trained": PRETRAINED + budget,
        },
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))
    report = {"granularity": GRANULARITY[method], "ratio_achieved": ratio, "params_after": {"total": 1000}}
    (folder / "models" / "pruned" / "prune_report.json").write_text(json.dumps(report))
    return folder


def parent_offset(seed: int) -> float:
    return -1.0 + 0.02 * (seed % 3 - 1)


def replicated(root: Path, method: str, ratio: float, budget: int, gaps1: list[float], gap2: float = 0.1):
    """A grid point with one replicate per gap in `gaps1` (seeds 0, 1, ...)."""
    for seed, gap in enumerate(gaps1):
        cell(root, method, ratio, budget, seed, gap, gap2 + 0.01 * (seed - 1))


def claim(data: dict, number: int) -> dict:
    return next(f for f in data["study"]["findings"] if f["claim"] == number)


def detail(data: dict, method: str, number: int = 1) -> dict:
    return next(d for d in claim(data, number)["details"] if d["method"] == method)


def test_a_seed_gap_is_the_mean_over_replicates_with_sd_over_sqrt_n():
    gaps = {seed: Gap(value, 0.01) for seed, value in enumerate([0.25, 0.30, 0.35])}
    gap = SeedGap.of(gaps)
    assert gap.value == pytest.approx(0.3) and gap.sd == pytest.approx(0.05)
    assert gap.seed_se == pytest.approx(0.05 / math.sqrt(3)) and gap.noise == MEASURED
    assert gap.window_se == pytest.approx(math.sqrt(3 * 0.01**2) / 3)
    assert gap.direction == 1
    two = SeedGap.of({0: Gap(0.3, 0.01), 1: Gap(0.31, 0.01)})
    assert two.sd is None and two.seed_se is None and two.direction is None  # fewer than 3: no seed noise


@pytest.mark.parametrize(("spread", "beyond"), [(0.05, 1), (0.5, 0)])
def test_a_gap_of_0_3_nats_is_beyond_noise_only_with_a_small_seed_spread(tmp_path, spread, beyond):
    replicated(tmp_path, "wanda", 0.5, 1_000, [0.3 - spread, 0.3, 0.3 + spread])
    found = detail(write_report(tmp_path), "wanda")
    assert found["gap"] == pytest.approx(0.3, abs=0.005)
    assert found["seed_sd"] == pytest.approx(spread, rel=0.05) and found["noise"] == MEASURED
    assert found["beyond_noise"] == beyond
    # The window noise is reported beside the seed noise, and is far smaller: never the criterion.
    assert found["window_se"] < 0.01 < found["seed_se"]


def test_a_cell_without_replicates_borrows_the_measured_seed_noise_and_says_so(tmp_path):
    replicated(tmp_path, "wanda", 0.5, 1_000, [0.25, 0.30, 0.35])  # seed sd 0.05
    cell(tmp_path, "shortgpt", 0.5, 1_000, 0, 0.3, -0.2)  # one seed only
    cell(tmp_path, "minitron_width", 0.5, 1_000, 0, 0.05, 0.0)
    data = write_report(tmp_path)
    borrowed = detail(data, "shortgpt")
    assert borrowed["noise"] == BORROWED and borrowed["seeds"] == [0]
    assert borrowed["seed_se"] == pytest.approx(0.05, rel=0.05)  # the pooled sd over sqrt(1)
    assert "of 1 replicated points at budget 1,000 (setting 1)" in borrowed["noise_source"]
    assert borrowed["beyond_noise"] == 1  # 0.3 > 1.96 x 0.05
    assert detail(data, "minitron_width")["beyond_noise"] == 0  # 0.05 < 1.96 x 0.05
    assert "borrowed by 2 without replicates" in claim(data, 1)["numbers"]
    text = (tmp_path / "report.md").read_text()
    assert "| shortgpt | depth | 0.5 | 1,000 | 1 |" in text and "pooled seed sd 0.05" in text


def test_fewer_than_three_replicates_give_no_seed_noise_and_no_verdict(tmp_path):
    replicated(tmp_path, "wanda", 0.5, 1_000, [0.3, 0.32])
    replicated(tmp_path, "shortgpt", 0.5, 1_000, [0.3, 0.32], gap2=-0.3)
    data = write_report(tmp_path)
    assert claim(data, 1)["verdict"] == NOT_JUDGED and NO_SEED_NOISE in claim(data, 1)["numbers"]
    assert claim(data, 4)["verdict"] == NOT_JUDGED
    assert detail(data, "wanda")["seed_se"] is None and detail(data, "wanda")["noise"] == "none"
    assert all(row["seed_sd"] is None for row in data["study"]["seed_noise"])
    assert "no seed noise is measured" in (tmp_path / "report.md").read_text()


def test_the_report_states_the_seed_noise_per_kind_and_budget(tmp_path):
    for budget, jitter in ((1_000, 0.05), (100_000, 0.01)):
        replicated(tmp_path, "wanda", 0.5, budget, [0.3 - jitter, 0.3, 0.3 + jitter])
    data = write_report(tmp_path)
    assert data["study"]["seeds"] == [0, 1, 2]
    rows = {(row["budget"], row["kind"]): row for row in data["study"]["seed_noise"]}
    assert rows[(1_000, "gap (setting 1)")]["seed_sd"] == pytest.approx(0.05, rel=0.1)
    assert rows[(100_000, "gap (setting 1)")]["seed_sd"] == pytest.approx(0.01, rel=0.3)
    assert rows[(1_000, "parent")]["seed_sd"] == pytest.approx(0.02, rel=0.2)  # parent_offset's spread
    assert rows[(1_000, "continued")]["points"] == 1 and rows[(1_000, "continued")]["window_se"] > 0
    text = (tmp_path / "report.md").read_text()
    assert "## Seed noise" in text and "| 1,000 | gap (setting 1) | 0.05" in text


def test_trend_claims_count_a_change_only_beyond_the_seed_noise_of_the_difference(tmp_path):
    # Claim 2: the gap narrows by 0.3 in every seed (paired change sd ~0): narrows beyond noise.
    replicated(tmp_path, "wanda", 0.5, 1_000, [0.5, 0.55, 0.6])
    replicated(tmp_path, "wanda", 0.5, 100_000, [0.2, 0.25, 0.3])
    # ...but by 0.05 on average with changes of sd 0.3 across seeds: within noise, not narrowed.
    replicated(tmp_path, "shortgpt", 0.5, 1_000, [0.5, 0.5, 0.5])
    replicated(tmp_path, "shortgpt", 0.5, 100_000, [0.15, 0.75, 0.45])
    data = write_report(tmp_path)
    assert detail(data, "wanda", 2)["narrowed"] is True
    assert detail(data, "wanda", 2)["narrowing"]["gap"] == pytest.approx(0.3, abs=0.01)
    assert detail(data, "shortgpt", 2)["narrowed"] is False
    assert claim(data, 2)["verdict"] == "mixed"


def test_one_verdict_per_claim_the_per_budget_win_count_is_gone_from_a_study(tmp_path):
    replicated(tmp_path, "wanda", 0.5, 1_000, [0.25, 0.3, 0.35])
    replicated(tmp_path, "wanda", 0.5, 100_000, [-0.05, 0.0, 0.05])  # within noise: not a win
    data = write_report(tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "## Pruned vs random init, per budget" not in text  # the sign count that judged claim 1 apart
    assert claim(data, 1)["verdict"] == "mixed"
    assert text.count("| 1 | 1 | same budget: the pruned init beats the random init |") == 1
    # Seed replicates are told apart in the budget tables.
    assert "| wanda (seed 2) | 0.5 (0.500) |" in text


def test_an_ordinary_report_keeps_its_per_budget_table(tmp_path):
    folder = cell(tmp_path, "wanda", 0.5, 1_000, 0, 0.3, 0.1)
    metrics = json.loads((folder / "metrics.json").read_text())
    del metrics["scratch_pipeline"]  # no setting 2: not a study
    (folder / "metrics.json").write_text(json.dumps(metrics))
    data = write_report(tmp_path)
    assert (
        "study" not in data and "## Pruned vs random init, per budget" in (tmp_path / "report.md").read_text()
    )


def test_a_study_with_every_claim_replicated_reads_as_before(tmp_path):
    for method, s2 in (("wanda", 0.1), ("shortgpt", -0.3)):
        for ratio, (small, large) in ((0.5, (0.5, 0.2)), (0.8, (0.3, 0.0))):
            replicated(tmp_path, method, ratio, 1_000, [small - 0.01, small, small + 0.01], s2 - 0.2)
            replicated(tmp_path, method, ratio, 100_000, [large - 0.01, large, large + 0.01], s2)
    data = write_report(tmp_path)
    assert {f["claim"]: f["verdict"] for f in data["study"]["findings"]} == {
        1: "mixed",  # ratio 0.8 at the largest budget: within noise of zero
        2: SUPPORTED,
        3: "mixed",  # narrows everywhere, but at the smallest budget 0.3 nats remain at ratio 0.8
        4: SUPPORTED,
    }


# -- the grid and its dry run -------------------------------------------------------------------


def sweep_text(root: Path, sweep: str, top: str = "") -> str:
    return (
        top
        + textwrap.dedent(
            f"""
        name: seeded
        output_dir: {root / "out"}
        parent:
          pretrain:
            token_budget: 512
            seq_len: 32
            config: {{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 4,
                      num_key_value_heads: 2, max_position_embeddings: 64}}
            tokenizer: {{vocab_size: 300, train_chars: 100000}}
            args: {{per_device_train_batch_size: 4, learning_rate: 1.0e-3, save_steps: 100}}
        calibration: {{num_samples: 2, seq_len: 32}}
        eval:
          perplexity:
            - {{name: pydoc, dataset: {{path: "hfprune:pydoc_topics", split: test}}, seq_len: 32, max_windows: 2}}
        train:
          runs: [continued, scratch, scratch_pipeline]
          seq_len: 32
          schedule: {{type: wsd, decay_ratio: 0.2}}
          args: {{per_device_train_batch_size: 4}}
        sweep:
          method: [shortgpt, wanda]
          ratio: [0.5]
          token_budget: [128, 256]
        """
        )
        + textwrap.indent(sweep, "  ")
    )


def write_sweep_file(root: Path, sweep: str, top: str = "") -> Path:
    path = root / "seeded.yaml"
    path.write_text(sweep_text(root, sweep, top))
    return path


def test_seed_replicates_replay_the_pipeline_with_their_own_parent(tmp_path):
    grid = load_sweep(write_sweep_file(tmp_path, "seed: [0, 1, 2]\nreplicate_methods: [wanda]\n"))
    ids = [cell.id for cell in grid.cells]
    assert "wanda-r0.5-t128-s2" in ids and "shortgpt-r0.5-t128-s0" in ids
    assert "shortgpt-r0.5-t128-s1" not in ids  # not replicated: the first seed only
    assert len(ids) == 2 * 3 + 2
    parents = {cell.seed: cell.recipe.parent.model for cell in grid.cells}
    assert parents == {s: str(tmp_path / "out" / "models" / f"parent-seed{s}") for s in (0, 1, 2)}
    assert {cell.seed: cell.recipe.seed for cell in grid.cells} == {0: 0, 1: 1, 2: 2}
    assert [c.id for c in grid.select(["seed=1"])] == ["wanda-r0.5-t128-s1", "wanda-r0.5-t256-s1"]
    # One seed: folder names and the shared parent as before seeds existed.
    single = load_sweep(write_sweep_file(tmp_path, "", top="seed: 3\n"))
    assert single.cells[0].id == "shortgpt-r0.5-t128"
    assert single.cells[0].recipe.parent.model == str(tmp_path / "out" / "models" / "parent")
    assert single.cells[0].seed == 3


@pytest.mark.parametrize(
    ("sweep", "top", "problem"),
    [
        ("seed: [0, 1]\n", "seed: 0\n", "also given as sweep.seed"),
        ("seed: [0, 0, 1]\n", "", "each value may appear once"),
        ("replicate_methods: [wanda]\n", "", "needs sweep.seed with two or more seeds"),
        ("seed: [0, 1, 2]\nreplicate_methods: [flap]\n", "", "not a method of this sweep"),
        ("seeds: [0, 1]\n", "", "seeds"),  # unknown keys are errors
    ],
)
def test_invalid_seed_sweeps_are_refused_before_any_work(tmp_path, sweep, top, problem):
    with pytest.raises(RecipeError) as err:
        load_sweep(write_sweep_file(tmp_path, sweep, top))
    assert problem in str(err.value)


def test_the_dry_run_lists_the_seed_replicates(tmp_path):
    path = write_sweep_file(tmp_path, "seed: [0, 1, 2]\nreplicate_methods: [wanda]\n")
    result = CliRunner().invoke(main, ["sweep", str(path), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "Seed replicates: 3, each with its own parent, data order and initialisations." in result.output
    assert f"| 1 | {tmp_path / 'out' / 'models' / 'parent-seed1'} | 2 | wanda |" in result.output
    assert "| wanda-r0.5-t256-s2 |" in result.output
    plan = json.loads(result.stdout[result.stdout.index("{") :])
    assert [s["seed"] for s in plan["seeds"]] == [0, 1, 2] and plan["seeds"][0]["cells"] == 4
    assert {row["cell"]: row["seed"] for row in plan["cells"]}["wanda-r0.5-t128-s1"] == 1
    # Every seed's models train on stable runs of their own: no replicate branches from another's.
    groups = [set(group["cells"]) for group in plan["branch_plans"]]
    assert all(len({cell.rsplit("-s", 1)[-1] for cell in group if "-s" in cell}) <= 1 for group in groups)

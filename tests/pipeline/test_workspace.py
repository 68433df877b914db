"""The workspace of a run: its paths come from the kind registry, and metrics.json changes only through
one atomic read-modify-write."""

from __future__ import annotations

import json

import pytest

from hfprune.pipeline.workspace import MetricsStore, Workspace


def test_update_merges_into_what_is_on_disk_now(tmp_path):
    store = MetricsStore(tmp_path / "metrics.json")
    first, second = MetricsStore(store.path), MetricsStore(store.path)  # two writers, no shared copy
    first.update("pruned", params={"total": 10})
    second.update("pruned", perplexity={"pydoc": 3.0})
    second.update("parent", params={"total": 20})
    assert json.loads(store.path.read_text()) == {
        "pruned": {"params": {"total": 10}, "perplexity": {"pydoc": 3.0}},
        "parent": {"params": {"total": 20}},
    }
    assert not [p for p in tmp_path.iterdir() if p.name != "metrics.json"]  # no temporary left


def test_replace_and_drop(tmp_path):
    store = MetricsStore(tmp_path / "metrics.json")
    store.update("scratch", perplexity={"pydoc": 3.0}, lm_eval={"average": 0.5}, hub={"url": "u"})
    assert store.update("scratch", drop=["lm_eval", "absent"], params=1) == {
        "perplexity": {"pydoc": 3.0},
        "hub": {"url": "u"},
        "params": 1,
    }
    assert store.update("scratch", replace=True, tokens_trained=256) == {"tokens_trained": 256}
    assert store.read() == {"scratch": {"tokens_trained": 256}}


def test_scores_hash_ignores_push_records(tmp_path):
    store = MetricsStore(tmp_path / "metrics.json")
    assert store.scores_hash() == "none"
    store.update("continued", perplexity={"pydoc": 3.0})
    before = store.scores_hash()
    store.update("continued", hub={"commit": "abc"})
    assert store.scores_hash() == before
    store.update("continued", perplexity={"pydoc": 2.0})
    assert store.scores_hash() != before


def test_paths_follow_the_kind_registry_and_opening_creates_nothing(tmp_path):
    ws = Workspace(tmp_path / "out")
    with ws.session():
        pass
    assert not ws.root.exists()
    assert ws.pruned_dir == ws.root / "models" / "pruned"
    assert ws.model_dir("scratch") == ws.root / "models" / "scratch"
    assert ws.train_dir("continued") == ws.root / ".hfprune" / "train" / "continued"
    with pytest.raises(ValueError, match="'parent' has no folder"):
        ws.model_dir("parent")
    (ws.model_dir("continued")).mkdir(parents=True)
    assert ws.saved_kinds() == []
    (ws.model_dir("continued") / "config.json").write_text("{}")
    assert ws.saved_kinds() == ["continued"] and ws.has_model("continued") and not ws.has_model("parent")

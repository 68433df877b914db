"""The real huggingface_hub and transformers clients against ``fakehub.FakeHub`` over loopback HTTP."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from fakehub import FakeHub
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    ModelCard,
    ModelCardData,
    constants,
    create_repo,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM


pytest_plugins = ["hub_fixtures"]  # the fake_hub fixture

REPO = "tester/tiny-llama"  # the fixture's user is "tester"
TITLE = "Add tiny llama"
DESCRIPTION = "Pruned from nothing; test fixture."
PROMPT = torch.tensor([[1, 5, 9, 42, 7]])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama saved with save_pretrained, plus a README.md model card."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=128,
        max_position_embeddings=64,
    )
    folder = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    data = ModelCardData(license="apache-2.0", tags=["hfprune", "pruned"], base_model="org/parent")
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n# tiny-llama\n\nA test model.\n").save(folder / "README.md")
    return folder


@pytest.fixture
def api(fake_hub) -> HfApi:
    """An HfApi client, with REPO already created on the fake hub."""
    api = HfApi()
    api.create_repo(REPO)
    return api


def _publish(api: HfApi, folder: Path):
    return api.upload_folder(
        repo_id=REPO, folder_path=folder, commit_message=TITLE, commit_description=DESCRIPTION
    )


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(PROMPT).logits


def test_fixture_points_every_client_at_the_fake_hub(fake_hub) -> None:
    assert fake_hub.url == constants.ENDPOINT
    assert constants.HUGGINGFACE_CO_URL_TEMPLATE.startswith(fake_hub.url + "/")
    assert constants.HF_HUB_OFFLINE is False


def test_whoami_sends_the_token_as_bearer_header(fake_hub) -> None:
    assert HfApi().whoami()["name"] == fake_hub.user == "tester"
    (request,) = [r for r in fake_hub.requests if r.path == "/api/whoami-v2"]
    assert request.headers["authorization"] == f"Bearer {fake_hub.token}"
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(token="hf_wrong").whoami()
    assert err.value.response.status_code == 401


def test_create_repo_conflict_and_exist_ok(fake_hub) -> None:
    url = create_repo(REPO)  # module-level function: goes through huggingface_hub.hf_api.api
    assert url.repo_id == REPO and url.startswith(fake_hub.url)
    with pytest.raises(HfHubHTTPError) as err:
        create_repo(REPO)
    assert err.value.response.status_code == 409
    assert create_repo(REPO, exist_ok=True).repo_id == REPO
    # Like the real Hub, a new repo starts with one commit holding .gitattributes.
    assert [c.title for c in fake_hub.commits(REPO)] == ["initial commit"]
    assert fake_hub.repo(REPO).private is False


def test_upload_folder_records_files_and_commit(api: HfApi, fake_hub, tiny_dir: Path) -> None:
    info = _publish(api, tiny_dir)
    local = {p.name: p.read_bytes() for p in tiny_dir.iterdir()}
    assert {"config.json", "model.safetensors", "README.md"} <= set(local)
    remote = fake_hub.repo_files(REPO)
    assert remote.pop(".gitattributes")
    assert remote == local

    model_info = api.model_info(REPO)
    assert model_info.sha == info.oid == fake_hub.commits(REPO)[0].sha
    assert {s.rfilename for s in model_info.siblings} == {*local, ".gitattributes"}
    assert set(api.list_repo_files(REPO)) == {*local, ".gitattributes"}
    commits = api.list_repo_commits(REPO)
    assert [(c.title, c.message) for c in commits] == [(TITLE, DESCRIPTION), ("initial commit", "")]
    # Every file went inline as "regular": no LFS batch and no xet traffic.
    assert not [r for r in fake_hub.requests if "lfs" in r.path or "xet" in r.path]


def test_token_only_travels_in_the_authorization_header(api: HfApi, fake_hub, tiny_dir: Path) -> None:
    _publish(api, tiny_dir)
    snapshot_download(REPO)
    for request in fake_hub.requests:
        other_headers = {k: v for k, v in request.headers.items() if k != "authorization"}
        assert fake_hub.token not in request.path + json.dumps(other_headers)
        assert fake_hub.token.encode() not in request.body
    assert all(r.headers.get("authorization") == f"Bearer {fake_hub.token}" for r in fake_hub.requests)


def test_from_pretrained_and_downloads(api: HfApi, fake_hub, tiny_dir: Path) -> None:
    head = _publish(api, tiny_dir).oid
    remote = AutoModelForCausalLM.from_pretrained(REPO)  # empty cache: every file comes over HTTP
    local = AutoModelForCausalLM.from_pretrained(tiny_dir)
    torch.testing.assert_close(_logits(remote), _logits(local), rtol=0, atol=0)
    # transformers probed optional files and took the EntryNotFound 404s in its stride.
    assert any(r.status == 404 and "adapter_config.json" in r.path for r in fake_hub.requests)

    snapshot = Path(snapshot_download(REPO))
    assert snapshot.name == head  # cache snapshots are keyed by X-Repo-Commit
    assert (snapshot / "model.safetensors").read_bytes() == (tiny_dir / "model.safetensors").read_bytes()
    assert Path(hf_hub_download(REPO, "config.json")).read_bytes() == (tiny_dir / "config.json").read_bytes()


def test_seeded_repo_downloads_without_a_token(fake_hub, tiny_dir: Path) -> None:
    files = {p.name: p.read_bytes() for p in tiny_dir.iterdir()}
    commit = fake_hub.seed("org/parent", files)
    snapshot = Path(snapshot_download("org/parent", token=False))
    assert snapshot.name == commit.sha
    assert {p.name: p.read_bytes() for p in snapshot.iterdir() if p.name != ".gitattributes"} == files
    assert not [r for r in fake_hub.requests if "authorization" in r.headers]


def test_context_manager_standalone() -> None:
    with FakeHub(token="hf_other", user="someone") as hub:
        request = urllib.request.Request(
            hub.url + "/api/whoami-v2", headers={"Authorization": "Bearer hf_other"}
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            assert json.load(response)["name"] == "someone"
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(hub.url + "/api/whoami-v2", timeout=5)
        err.value.close()
        assert err.value.code == 401
        assert [r.status for r in hub.requests] == [200, 401]
    with pytest.raises(OSError):  # stopped: nothing listens on the port any more
        urllib.request.urlopen(hub.url + "/api/whoami-v2", timeout=5)


def test_model_card_round_trip(api: HfApi, tiny_dir: Path) -> None:
    _publish(api, tiny_dir)
    data = ModelCard.load(REPO).data.to_dict()
    assert data["license"] == "apache-2.0"
    assert data["tags"] == ["hfprune", "pruned"]
    assert data["base_model"] == "org/parent"


def test_identical_reupload_creates_no_commit(api: HfApi, fake_hub, tiny_dir: Path, tmp_path) -> None:
    # Finding (huggingface_hub 2.4.0, HfApi.create_commit): the Hub's preupload answer gives the "oid" of each
    # file already on the branch (git blob sha1 for regular files, sha256 for LFS), and the client drops every
    # addition whose local oid matches. The fake answers the same way. When nothing is left, the client sends
    # no /commit request, logs "No files have been modified since last commit. Skipping to prevent empty
    # commit." and returns a CommitInfo whose oid is the current head (create_commit with no operations does
    # the same). So re-publishing identical files is a no-op, even with delete_patterns=["*"] (files being
    # uploaded are never deleted); a changed file gives a commit that carries only that file.
    first = _publish(api, tiny_dir)
    commits_before = len(fake_hub.commits(REPO))
    second = _publish(api, tiny_dir)
    assert second.oid == first.oid
    assert len(fake_hub.commits(REPO)) == commits_before
    assert sum(r.method == "POST" and "/commit/" in r.path for r in fake_hub.requests) == 1

    changed = tmp_path / "changed"
    changed.mkdir()
    for path in tiny_dir.iterdir():
        (changed / path.name).write_bytes(path.read_bytes())
    (changed / "README.md").write_text((tiny_dir / "README.md").read_text() + "\nMore text.\n")
    third = _publish(api, changed)
    assert third.oid != first.oid
    ndjson = [json.loads(line) for line in fake_hub.requests[-1].body.splitlines()]
    assert [(op["key"], op["value"]["path"]) for op in ndjson[1:]] == [("file", "README.md")]


def test_delete_operations(api: HfApi, fake_hub) -> None:
    adds = [CommitOperationAdd(f"logs/{i}.txt", b"x") for i in range(2)] + [CommitOperationAdd("a.txt", b"a")]
    api.create_commit(REPO, adds, commit_message="add")
    api.create_commit(
        REPO, [CommitOperationDelete("logs/"), CommitOperationDelete("a.txt")], commit_message="rm"
    )
    assert set(fake_hub.repo_files(REPO)) == {".gitattributes"}
    assert set(fake_hub.repo_files(REPO, revision=fake_hub.commits(REPO)[1].sha)) == {
        ".gitattributes",
        "a.txt",
        "logs/0.txt",
        "logs/1.txt",
    }
    with pytest.raises(EntryNotFoundError):
        api.create_commit(REPO, [CommitOperationDelete("a.txt")], commit_message="rm again")


def test_injected_commit_failure_surfaces_as_http_error(api: HfApi, fake_hub) -> None:
    # The /commit POST is not retried by huggingface_hub (a retry after a lost answer could commit twice),
    # so a 5xx reaches the caller at once; retrying is the publishing code's job.
    fake_hub.fail_next(1, status=500, path_contains="/commit/")
    add = CommitOperationAdd("note.txt", b"hello")
    with pytest.raises(HfHubHTTPError) as err:
        api.create_commit(REPO, [add], commit_message="first try")
    assert err.value.response.status_code == 500
    assert [c.title for c in fake_hub.commits(REPO)] == ["initial commit"]
    api.upload_file(
        path_or_fileobj=b"hello", path_in_repo="note.txt", repo_id=REPO, commit_message="second try"
    )
    assert fake_hub.repo_files(REPO)["note.txt"] == b"hello"
    assert [r.status for r in fake_hub.requests if "/commit/" in r.path] == [500, 200]


def test_preupload_5xx_is_retried_by_the_client(api: HfApi, fake_hub) -> None:
    # Unlike /commit, the preupload POST goes through http_backoff (429/5xx, 1 s first wait).
    fake_hub.fail_next(1, status=503, path_contains="/preupload/")
    api.upload_file(path_or_fileobj=b"hello", path_in_repo="note.txt", repo_id=REPO)
    assert [r.status for r in fake_hub.requests if "/preupload/" in r.path] == [503, 200]
    assert fake_hub.repo_files(REPO)["note.txt"] == b"hello"


def test_missing_repo_and_missing_file(api: HfApi) -> None:
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("tester/does-not-exist")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("tester/does-not-exist", "config.json")
    assert api.file_exists(REPO, ".gitattributes")
    assert not api.file_exists(REPO, "config.json")


def test_private_repo(fake_hub) -> None:
    api = HfApi()
    api.create_repo(REPO, private=True)
    assert fake_hub.repo(REPO).private is True
    assert api.model_info(REPO).private is True
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=False).model_info(REPO)


def test_dataset_repo(fake_hub) -> None:
    api = HfApi()
    api.create_repo(REPO, repo_type="dataset")
    api.upload_file(
        path_or_fileobj=b'{"text": "hi"}\n', path_in_repo="train.jsonl", repo_id=REPO, repo_type="dataset"
    )
    assert fake_hub.repo_files(REPO, repo_type="dataset")["train.jsonl"] == b'{"text": "hi"}\n'
    assert Path(hf_hub_download(REPO, "train.jsonl", repo_type="dataset")).read_text() == '{"text": "hi"}\n'
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(REPO)  # same name, but only the dataset exists

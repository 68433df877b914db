"""Pytest fixture that points huggingface_hub and transformers at a fresh ``FakeHub``.

Use it from a test module with ``from hub_fixtures import fake_hub  # noqa: F401``, or for the whole suite
with ``pytest_plugins = ["hub_fixtures"]`` in tests/conftest.py. The bare module name works because tests/
has no ``__init__.py``, so pytest puts tests/ itself on ``sys.path`` (as for ``from conftest import ...``).
If tests/ ever becomes a package, these names become ``tests.hub_fixtures`` and ``tests.fakehub``.

Setting ``HF_ENDPOINT`` is not enough once huggingface_hub has been imported: it copies the endpoint, the
cache paths and the offline flag into module constants at import time, and its module-level ``HfApi``
(behind ``huggingface_hub.create_repo``, ``whoami``, ...) copies the endpoint when it is built. So the
fixture patches those copies too, for the length of one test.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from fakehub import FakeHub
from huggingface_hub import close_session, constants, hf_api
from huggingface_hub.utils import _cache_assets, _cache_manager


TEST_TOKEN = "hf_test_secret_token_123"
TEST_USER = "tester"


def _patch_hub_constants(monkeypatch: pytest.MonkeyPatch, endpoint: str, home: str) -> None:
    hub_cache, assets = os.path.join(home, "hub"), os.path.join(home, "assets")
    values = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": False,
        "HF_HOME": home,
        "HF_HUB_CACHE": hub_cache,
        "HUGGINGFACE_HUB_CACHE": hub_cache,
        "HF_ASSETS_CACHE": assets,
        "HUGGINGFACE_ASSETS_CACHE": assets,
        "HF_XET_CACHE": os.path.join(home, "xet"),
        "HF_TOKEN_PATH": os.path.join(home, "token"),
        "HF_STORED_TOKENS_PATH": os.path.join(home, "stored_tokens"),
        "AGENT_HARNESSES_PATH": os.path.join(home, ".agent_harnesses.json"),
        "CHECK_FOR_UPDATE_DONE_PATH": os.path.join(home, ".check_for_update_done"),
    }
    for name, value in values.items():
        monkeypatch.setattr(constants, name, value)
    # Copies made with "from ..constants import X" at import time.
    monkeypatch.setattr(_cache_manager, "HF_HUB_CACHE", hub_cache)
    monkeypatch.setattr(_cache_assets, "HF_ASSETS_CACHE", assets)
    # The shared HfApi behind the module-level functions, and its per-token whoami cache.
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)
    monkeypatch.setattr(hf_api.api, "_whoami_cache", {})


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    """A running ``FakeHub`` (token ``TEST_TOKEN``, user ``TEST_USER``) that all Hub clients talk to."""
    hub = FakeHub(token=TEST_TOKEN, user=TEST_USER)
    endpoint = hub.start()
    # Not under tmp_path: a test that uploads its tmp_path must not upload the download cache too.
    home = str(tmp_path_factory.mktemp("hf_home"))
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_TOKEN", TEST_TOKEN)
    monkeypatch.setenv("HF_HOME", home)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    _patch_hub_constants(monkeypatch, endpoint, home)
    try:
        yield hub
    finally:
        # Drop the shared client's keep-alive connections to this server before it goes away.
        close_session()
        hub.stop()

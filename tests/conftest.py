import os
from pathlib import Path

import pytest

# No hub at run time: fail fast instead of retrying DNS for ~45 s.
for _flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_flag, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DATA = Path(__file__).parent / "data"
TINY_LLAMA = str(DATA / "tiny-llama")
REPO = Path(__file__).parent.parent


@pytest.fixture(scope="session")
def tiny_llama() -> str:
    return TINY_LLAMA


@pytest.fixture(autouse=True)
def _isolated_hf_cache(tmp_path_factory, monkeypatch):
    # datasets writes its cache under HF_HOME; keep tests out of the user's cache
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.getbasetemp() / "hf_home"))

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

# No hub at run time: fail fast instead of retrying DNS for ~45 s.
for _flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_flag, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# datasets reads its cache location at import: keep the suite out of the user's cache
if "HF_DATASETS_CACHE" not in os.environ:
    os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="madpo-tests-datasets-")
    atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], ignore_errors=True)
# tiny models: thread start-up costs more than it saves, and the suite shares 2 cores with itself
torch.set_num_threads(1)

DATA = Path(__file__).parent / "data"
TINY_LLAMA = str(DATA / "tiny-llama")
REPO = Path(__file__).parent.parent


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Every test module starts on one intra-op thread, whatever an earlier in-process run left behind (the
    pipeline's `trainer.num_threads` calls `torch.set_num_threads` for the process): test files need no own copy."""
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def tiny_llama() -> str:
    return TINY_LLAMA


@pytest.fixture(scope="module")
def random_reward_model(tmp_path_factory) -> str:
    """A reward-model directory (tiny Llama backbone, random head, the tiny tokenizer), as fit would export it."""
    from madpo.modeling import init_reward_model, load_tokenizer

    path = tmp_path_factory.mktemp("rm") / "rm"
    tok = load_tokenizer(TINY_LLAMA)
    torch.manual_seed(0)
    init_reward_model(TINY_LLAMA, pad_token_id=tok.pad_token_id).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)

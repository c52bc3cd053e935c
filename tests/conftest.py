import os
import shutil
import tempfile

# the token cache's default folder is HF_DATASETS_CACHE/dtrpo: the tests (and the commands they start) keep theirs in
# a folder of their own, removed at the end, never in the user's datasets cache; set before datasets is imported
DATASETS_CACHE = os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="dtrpo-tests-datasets-")

import pytest
import torch

from dtrpo.models import adapter_from_config, make_char_tokenizer, make_tiny_model


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tokenizer():
    return make_char_tokenizer()


@pytest.fixture(scope="session")
def tiny(tokenizer):
    """(policy, reference, adapter): two different random tiny models with block size 4."""
    policy = make_tiny_model(tokenizer, block_size=4, seed=0)
    reference = make_tiny_model(tokenizer, block_size=4, seed=1)
    return policy, reference, adapter_from_config(policy.config, tokenizer)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(DATASETS_CACHE, ignore_errors=True)

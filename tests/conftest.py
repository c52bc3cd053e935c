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

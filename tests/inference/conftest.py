"""Fixtures of the generation tests: a tiny random LM per mixer (see gen_helpers)."""
import pytest
from gen_helpers import build


@pytest.fixture(scope="module", params=["mamba1", "mamba2", "hybrid"])
def model(request):
    return build(request.param)

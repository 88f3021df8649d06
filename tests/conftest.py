"""Test setup.

Without a GPU the Triton kernels run through Triton's interpreter (TRITON_INTERPRET=1, CPU tensors, tiny
shapes). The variable must be set before any kernel is defined, so it is set here, before mambakit imports.
"""
import os

if os.environ.get("MAMBAKIT_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_report_header(config):
    dev = os.environ.get("MAMBAKIT_TEST_DEVICE", "cpu")
    return f"mambakit tests on {dev}; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"

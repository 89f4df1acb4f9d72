"""Test-wide settings: quiet progress bars and a private cache, so tests never touch the user's."""

import os

import pytest
import torch
from helpers import make_tiny_suite
from tiny_fixtures import make_images, tiny  # noqa: F401  (fixtures for detector and guard tests)


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory):
    os.environ["OODLAB_QUIET"] = "1"
    os.environ["OODLAB_CACHE"] = str(tmp_path_factory.mktemp("oodlab-cache"))
    os.environ.setdefault("OODLAB_DEVICE", "cpu")
    yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def tiny_suite():
    return make_tiny_suite()

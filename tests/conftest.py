import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from models import FAMILIES  # noqa: E402


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return request.param


@pytest.fixture
def model(family):
    return FAMILIES[family]()


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield

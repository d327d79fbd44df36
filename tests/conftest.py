import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from models import FAMILIES  # noqa: E402

torch.set_num_threads(1)  # tiny models: threads only contend on the 2-core CI machine


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

import os
import sys
from pathlib import Path

# Triton kernels run through Triton's interpreter where there is no NVIDIA GPU (CI). The flag is read when
# triton is first imported, which `import torch` does when triton is installed: it must be set before that.
if not Path("/dev/nvidia0").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

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
def _restore_library_logging():
    """``gsq-hf`` quiets transformers/datasets for its process; give the next test their defaults back."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    yield
    transformers.logging.set_verbosity(verbosity)
    transformers.logging.enable_progress_bar()
    try:  # absent on a GPU machine that runs only the kernel tests
        import datasets
    except ImportError:
        return
    datasets.enable_progress_bars()


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield

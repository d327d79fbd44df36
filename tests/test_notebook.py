"""``docs/notebooks/quickstart.ipynb`` runs top to bottom, offline, in a kernel of this interpreter."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from tables import parse_table

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "docs" / "notebooks" / "quickstart.ipynb"
KERNEL = "gsq-hf-test"


@pytest.fixture
def kernel(tmp_path, monkeypatch) -> str:
    """A kernelspec for ``sys.executable`` (the interpreter gsq_hf is installed in), found via JUPYTER_PATH."""
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "gsq_hf test kernel", "language": "python",
    }))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the notebook must not need the network
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    # the kernel imports gsq_hf from this checkout, not from wherever the package is installed
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return KERNEL


@pytest.mark.slow
def test_quickstart_notebook_executes(kernel, tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # timeout: a hang guard per cell, not a speed target (the notebook takes 20-40 s on an idle 2-core CPU)
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name=kernel,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError on the first cell that fails
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 3  # the precision trace of a generate, the Pareto plot, the gate trace of the eval
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream" and o.name == "stdout")
    assert "state_bytes" in text and "gsq-budget" in text and "reference (unpatched" in text
    lines = text.splitlines()  # the eval table: every preset after fp32 scored against it
    table = "\n".join(lines[next(i for i, line in enumerate(lines) if line.startswith("config") and " ppl " in line):])
    rows = parse_table(table)
    assert len(rows) == 8 and rows[0]["config"] == "fp32" and rows[0]["KL vs first"] == "-"
    for row in rows[1:]:
        assert float(row["KL vs first"]) >= 0 and 0 < float(row["top-1"].rstrip("%")) <= 100, row
    assert "\ncolumns (Δ, KL and top-1 compare each row with the first, fp32):" in table

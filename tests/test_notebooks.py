"""The tutorial notebooks run top to bottom in quick mode on this backend.

Each notebook is executed by a fresh kernel of this Python interpreter with
KERAS_BACKEND set to the backend of this pytest process and KERAS_BN_QUICK=1
(small data, few steps). The notebooks assert their own worked numbers, so a
wrong claim fails here as a cell error.
"""

import importlib.util
import pathlib

import keras
import pytest

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = ("01_batchnorm_from_scratch", "02_mnist", "03_cifar10")

_spec = importlib.util.spec_from_file_location(
    "notebook_common", NOTEBOOK_DIR / "_common.py")
notebook_common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(notebook_common)


def test_every_notebook_is_tested():
    assert sorted(p.stem for p in NOTEBOOK_DIR.glob("*.ipynb")) == list(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_in_quick_mode(name):
    backend = keras.backend.backend()
    nb = notebook_common.execute_notebook(
        NOTEBOOK_DIR / f"{name}.ipynb", backend=backend, quick=True,
        timeout=600)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(cell.execution_count for cell in code)
    outputs = [out for cell in code for out in cell.outputs]
    # The kernel ran on this backend, in quick mode.
    first = "".join(out.get("text", "") for out in code[0].outputs)
    assert f"backend: {backend}; quick mode: True" in first
    # Every figure was drawn into the notebook.
    figures = sum("image/png" in out.get("data", {}) for out in outputs)
    drawn = sum(cell.source.count("plt.subplots(") for cell in code)
    assert figures == drawn > 0

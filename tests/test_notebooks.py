"""Runs every notebook of notebooks/ in smoke mode, so that a broken notebook fails CI.

``LAB_OPTAX_SMOKE=1`` makes each notebook train tiny models (about 10 to 20 seconds
each on 2 CPU cores, kernel start included). The kernel runs in a temporary
directory with ``TMPDIR`` pointing there, so nothing a notebook writes lands in
the repository.
"""

from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
COLAB_URL = "https://colab.research.google.com/github/lab-optax/lab_optax/blob/main/notebooks/"


def test_the_notebooks_are_there():
  assert {path.name for path in NOTEBOOKS} >= {
    "quickstart.ipynb",
    "binary_lstm.ipynb",
    "deployment.ipynb",
    "beyond_one_bit.ipynb",
  }


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_opens_in_colab_and_installs_there(path):
  cells = nbformat.read(path, as_version=4).cells
  assert cells[0].cell_type == "markdown"
  assert COLAB_URL + path.name in cells[0].source
  install = cells[1].source
  assert cells[1].cell_type == "code"
  assert '"google.colab" in sys.modules' in install
  assert "git+https://github.com/lab-optax/lab_optax" in install


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_runs_in_smoke_mode(path, tmp_path, monkeypatch):
  # The kernel inherits this process's environment.
  monkeypatch.setenv("LAB_OPTAX_SMOKE", "1")
  monkeypatch.setenv("TMPDIR", str(tmp_path))
  notebook = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(
    notebook,
    timeout=600,  # per cell; a smoke run takes seconds
    kernel_name="python3",
    resources={"metadata": {"path": str(tmp_path)}},
  )
  client.execute()  # raises CellExecutionError, naming the cell, if a cell fails
  errors = [
    output
    for cell in notebook.cells
    for output in cell.get("outputs", [])
    if output.get("output_type") == "error"
  ]
  assert not errors

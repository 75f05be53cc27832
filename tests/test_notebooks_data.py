"""Executes notebooks/toy_world_and_packing.ipynb at small size (nbclient)."""

import os

import nbformat
import pytest

NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "notebooks", "toy_world_and_packing.ipynb")


def test_toy_world_and_packing_notebook_runs(monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    root = os.path.abspath(os.path.join(os.path.dirname(NOTEBOOK), ".."))
    monkeypatch.setenv("NOTEBOOK_N", "3")  # small size for CI
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    client = nbclient.NotebookClient(nb, timeout=60, kernel_name="python3",
                                     resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
    client.execute()
    outputs = "".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", []))
    assert "packing efficiency" in outputs and "examples unpacked exactly" in outputs

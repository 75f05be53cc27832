"""Executes notebooks/scaling.ipynb (nbclient) on a sweep the test runs with the fake loop.

The sweep goes through the real runner (experiments/scaling_sweep.py) with the fake
training command of tests/test_scaling_sweep.py, plus decoded-sample GIFs per point,
so every cell of the notebook (curves, fit, per-t, grid) has real inputs to draw.
"""

import os

import nbformat
import pytest

from test_scaling_sweep import _write_samples, fake, fake_plan, scaling_sweep  # noqa: F401 (fixture)

NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "notebooks", "scaling.ipynb")


def test_scaling_notebook_runs_on_a_sweep(tmp_path, fake, monkeypatch):  # noqa: F811
    nbclient = pytest.importorskip("nbclient")
    command, _, _ = fake
    root = tmp_path / "sweep"
    rows = scaling_sweep.run_sweep("base|4x|16x,preset=micro", str(root), command_fn=command, plan_fn=fake_plan,
                                   log=lambda m: None)
    for i, row in enumerate(rows):
        _write_samples(root / row["point"], i % 3)

    repo = os.path.abspath(os.path.join(os.path.dirname(NOTEBOOK), ".."))
    monkeypatch.setenv("SCALING_RESULTS", str(root / "results.json"))
    monkeypatch.setenv("SCALING_BOOTSTRAP", "50")
    monkeypatch.setenv("SORA_JAX_REPO", repo)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
    client.execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs)
    assert "16x_presetmicro" in text and "L(C) = a C^-b + c" in text and "grid:" in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2  # the curves
    assert sum("image/gif" in o.get("data", {}) for o in outputs) == 1  # the sample grid
    assert os.path.exists(root / "plots" / "samples_grid.mp4")

"""Executes notebooks/sampling_modes.ipynb on the tiny test checkpoint (nbclient, 2 sampling steps)."""

import os

import nbformat
import pytest

NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "notebooks", "sampling_modes.ipynb")

# The session fixtures (tiny_workdirs) come from one plugin registration, shared with the other sampling tests.
pytest_plugins = ("tests.sampling_fixtures",)

# One xdist worker runs every test that uses the shared tiny checkpoint, so it is trained once.
pytestmark = pytest.mark.xdist_group("tiny_checkpoint")



def test_sampling_modes_notebook_runs(tiny_workdirs, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    root = os.path.abspath(os.path.join(os.path.dirname(NOTEBOOK), ".."))
    monkeypatch.setenv("SAMPLING_WORKDIR", tiny_workdirs["dit"])
    monkeypatch.setenv("SAMPLING_STEPS", "2")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
    client.execute()
    outputs = "".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", []))
    for check in ("same seed, same video: True", "image-to-video keeps frame 0: True",
                  "forward keeps the given frames: True", "backward keeps the given frames: True",
                  "loop closes (last latent == first): True", "strength 0 returns the input: True",
                  "strength 1 ignores the input: True", "connect starts at A's end: True",
                  "connect ends at B's start: True", "rounded to"):
        assert check in outputs, (check, outputs)
    images = sum(1 for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
                 if "image/png" in o.get("data", {}))
    assert images >= 10

"""examples/quickstart.ipynb runs top to bottom in a real Jupyter kernel."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("MTNLG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "spec model: 5,916,829,696 parameters" in text
    assert "finished at step 30" in text
    assert "秋天的夜晚，星光闪烁，" in text
    assert any("image/png" in o.get("data", {}) for o in outputs if o.output_type == "display_data")
    assert not [o for o in outputs if o.output_type == "error"]

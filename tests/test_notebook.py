"""Execute notebooks/frontier.ipynb with nbclient (a real Jupyter kernel) against a study directory and check
that it reproduces the frontier table and figure from `rlhf_lab.eval.frontier`."""
from __future__ import annotations

import base64
import os
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from nbclient import NotebookClient

from rlhf_lab.eval import frontier as fr
from tests.synthetic_study import write_synthetic_study

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "frontier.ipynb"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def execute_frontier_notebook(study_dir: Path, workdir: Path, timeout: int = 180) -> nbformat.NotebookNode:
    """Run the notebook on `study_dir` (through RLHF_LAB_STUDY_DIR, as a user would); return it with outputs.
    Raises nbclient's CellExecutionError, with the failing cell's traceback, if any cell fails."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    env = {**os.environ, "RLHF_LAB_STUDY_DIR": str(Path(study_dir).resolve())}
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(workdir)}})
    client.execute(env=env)  # keyword arguments reach the kernel manager: the kernel process gets `env`
    return nb


def _stdout(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


def _pngs(cell) -> list[bytes]:
    return [base64.b64decode(o["data"]["image/png"]) for o in cell.get("outputs", [])
            if "data" in o and "image/png" in o["data"]]


def check_notebook_outputs(nb: nbformat.NotebookNode, points: pd.DataFrame) -> None:
    code = [c for c in nb.cells if c.cell_type == "code"]
    budgets = fr.default_kl_budgets(points)
    expected_table = fr.budget_table_text(fr.best_at_kl_budgets(points, budgets))
    table_cells = [c for c in code if "budget_table_text" in c.source]
    assert len(table_cells) == 1 and _stdout(table_cells[0]).strip() == expected_table.strip()
    front = fr.pareto_frontier(fr.aggregate_seeds(points))
    expected_counts = str(front.groupby("method_label").size().to_dict())
    assert any(expected_counts in _stdout(c) for c in code)
    pngs = [p for c in code for p in _pngs(c)]
    assert len(pngs) == 2 and all(p.startswith(PNG_MAGIC) and len(p) > 5000 for p in pngs)
    assert f"{points['run_id'].nunique()} runs" in _stdout(code[1])


def test_notebook_is_analysis_only():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    source = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "import torch" not in source and "def " not in source and "class " not in source
    assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # committed without outputs


def test_notebook_reproduces_frontier_on_synthetic_study(tmp_path):
    study = write_synthetic_study(tmp_path / "study", seeds=(0, 1))
    nb = execute_frontier_notebook(study, tmp_path)
    check_notebook_outputs(nb, pd.read_csv(study / "points.csv"))


@pytest.mark.integration
def test_notebook_on_the_smoke_study(tmp_path, smoke_study_dir):
    """The notebook on real runs: the smoke study's points table, run by the study runner (conftest)."""
    nb = execute_frontier_notebook(smoke_study_dir, tmp_path)
    check_notebook_outputs(nb, pd.read_csv(smoke_study_dir / "points.csv"))

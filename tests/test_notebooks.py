"""Every notebook in notebooks/ runs from a copy without an error or a warning in its outputs,
and the stored copies carry their outputs (small enough to show on GitHub)."""

from __future__ import annotations

import re
import shutil

import pytest

from tests.conftest import REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
# Python warnings as the warnings module prints them ("...: UserWarning: ..."), tracebacks
WARNING = re.compile(r"\b\w*Warning: |Traceback \(most recent call last\)")


def _problems(nb) -> list[str]:
    found = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        for out in cell.get("outputs", []):
            if out.output_type == "error":
                found.append(f"cell {i}: {out.ename}: {out.evalue}")
            elif out.output_type == "stream" and WARNING.search(out.text):
                found.append(f"cell {i}: {WARNING.search(out.text).group(0)} in {out.text.strip()[:300]}")
    return found


def test_there_are_notebooks():
    assert {"quickstart.ipynb", "fit_heads.ipynb", "embeddings.ipynb"} <= {p.name for p in NOTEBOOKS}


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_clean_from_a_copy(path, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    copy = tmp_path / path.name
    shutil.copy(path, copy)
    nb = nbformat.read(copy, as_version=4)
    for cell in nb.cells:  # run from scratch, not on top of the stored outputs
        if cell.cell_type == "code":
            cell.outputs = []
    # run where the copy is: whatever the notebook writes lands in tmp_path, not in the repository
    NotebookClient(nb, timeout=600, kernel_name="python3", allow_errors=True,
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    problems = _problems(nb)
    assert not problems, f"{path.name}:\n" + "\n".join(problems)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_stored_notebook_has_outputs_and_small_images(path):
    import base64

    import nbformat

    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.get("execution_count") for c in code), f"{path.name} is stored unexecuted"
    assert path.stat().st_size < 1_000_000
    images = [base64.b64decode(o["data"]["image/png"]) for c in code for o in c.outputs
              if "image/png" in o.get("data", {})]
    assert all(len(png) < 300_000 for png in images)
    assert not _problems(nb), f"{path.name} was stored with errors or warnings"


def test_problem_detection_catches_warnings_and_errors():
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x")])
    nb.cells[0].outputs = [nbformat.v4.new_output("stream", name="stderr",
                                                  text="/x/tqdm/auto.py:21: TqdmWarning: IProgress not found.")]
    assert _problems(nb)
    nb.cells[0].outputs = [nbformat.v4.new_output("error", ename="ValueError", evalue="bad", traceback=[])]
    assert _problems(nb)
    nb.cells[0].outputs = [nbformat.v4.new_output("stream", name="stdout", text="mean 1.29 m")]
    assert not _problems(nb)


def test_notebooks_do_not_reach_into_the_repository_by_relative_path():
    for path in NOTEBOOKS:
        if path.stem in ("quickstart", "fit_heads", "embeddings"):
            assert "../data_samples" not in path.read_text(), path.name

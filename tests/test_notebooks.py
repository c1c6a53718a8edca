"""The example notebooks: stored without outputs, in step with their generator, and they run.

Running them takes minutes, so that test is marked slow:
`pytest -m slow tests/test_notebooks.py`.
"""

import importlib.util
import os
import pathlib

import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))


def _generator():
    spec = importlib.util.spec_from_file_location(
        "_build_notebooks", EXAMPLES / "_build_notebooks.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_generated_notebook_is_there():
    names = {path.name for path in NOTEBOOKS}
    assert set(_generator().NOTEBOOKS) <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_notebook_is_valid_and_stored_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code, "a notebook with no code"
    for cell in code:
        assert cell.outputs == [], f"{path.name}: a cell was stored with its outputs"
        assert cell.execution_count is None, f"{path.name}: a cell was stored executed"


def test_stored_notebooks_match_their_generator():
    generator = _generator()
    for name, cells in generator.NOTEBOOKS.items():
        stored = (EXAMPLES / name).read_text(encoding="utf-8")
        assert stored == generator.render(cells), (
            f"{name} differs from examples/_build_notebooks.py; run "
            "`python examples/_build_notebooks.py` after editing its cells there"
        )


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_notebook_runs_without_error(path, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    # The kernel inherits this environment: no display, datasets prepared into
    # tmp_path, temporary files under it, and this checkout importable.
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tensorflow_datasets"))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    paths = [str(ROOT), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in paths if p))
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError, naming the cell, on any error
    errors = [
        output
        for cell in notebook.cells
        for output in cell.get("outputs", [])
        if output.get("output_type") == "error"
    ]
    assert not errors

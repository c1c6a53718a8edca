"""The documentation site: it builds strictly, its code runs, and it quotes the cell faithfully."""

import inspect
import os
import pathlib
import re
import subprocess
import sys
import tempfile

import pytest

from keras_lstm import GatedLSTMCell

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# Pages whose python blocks are complete programs, run top to bottom as one script.
RUNNABLE_PAGES = ["index.md", "quickstart.md", "cell.md", "migration.md", "faq.md"]


def _blocks(page: str, language: str) -> list[str]:
    text = (DOCS / page).read_text(encoding="utf-8")
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def test_site_builds_with_no_warnings(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", "mkdocs.yml", "-d", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    # mkdocstrings rendered the docstrings, not just the names.
    for text in ["GatedLSTMCell", "unit_forget_bias", "LSTMGates", "SeriesConfig", "seattle_temps"]:
        assert text in api, text
    for notebook in (ROOT / "examples").glob("*.ipynb"):
        assert (site / "examples" / notebook.stem / "index.html").exists(), notebook.name
    gates = (site / "examples" / "01_gates_explained" / "index.html").read_text(encoding="utf-8")
    assert "return_gates=True" in gates
    assert not (ROOT / ".cache").exists(), "the build wrote a cache into the checkout"


@pytest.mark.parametrize("page", RUNNABLE_PAGES)
def test_python_examples_in_the_page_run(page, tmp_path, monkeypatch):
    blocks = _blocks(page, "python")
    assert blocks, f"{page} has no python example"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tensorflow_datasets"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    namespace = {"__name__": f"docs_{page[:-3]}"}
    for index, block in enumerate(blocks):
        exec(compile(block, f"docs/{page} (python block {index + 1})", "exec"), namespace)


def test_cell_page_quotes_the_lines_of_cell_py():
    section = (DOCS / "cell.md").read_text(encoding="utf-8").split("## The code", 1)[1]
    quoted = re.search(r"```text\n(.*?)```", section, flags=re.S).group(1)
    source = {line.strip() for line in inspect.getsource(GatedLSTMCell.call).splitlines()}
    for line in filter(None, map(str.strip, quoted.splitlines())):
        assert line in source, (
            f"docs/cell.md quotes {line!r}, which GatedLSTMCell.call no longer has; "
            "update the page with the equations"
        )

"""mkdocs hook: publish the notebooks of examples/ under examples/ on the site.

The notebooks live beside the code, not in docs/; this adds them to the
site's files before mkdocs-jupyter turns each one into a page (stored without
outputs, rendered without running them).
"""

from __future__ import annotations

import pathlib

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

ROOT = pathlib.Path(__file__).resolve().parents[2]


@event_priority(100)  # before mkdocs-jupyter's on_files
def on_files(files, config):
    # A plain File rooted at the repository (not File.generated), since mkdocs-jupyter
    # reads a notebook from the path its src_dir and src_uri make.
    for path in sorted((ROOT / "examples").glob("*.ipynb")):
        files.append(
            File(
                f"examples/{path.name}",
                src_dir=str(ROOT),
                dest_dir=config.site_dir,
                use_directory_urls=config.use_directory_urls,
            )
        )
    return files

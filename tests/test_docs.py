"""The documentation site: built strictly (a broken link or reference fails), served on 127.0.0.1
and read in headless Chromium, as a user's browser shows it. The generated pages must follow the
code: every field of the job file, the API's docstrings, the benchmarks' headline."""

from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from lrsearch.job.config import JobConfig

ROOT = Path(__file__).resolve().parents[1]
#: the virtual environment's executables (mkdocs)
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run([str(BIN / "mkdocs"), "build", "--strict", "-d", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}"
    assert "WARNING" not in done.stderr, done.stderr
    return out


@pytest.fixture(scope="module")
def served(site) -> str:
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass


def _rendered_text(url: str, profile: Path) -> str:
    """The page as headless Chromium renders it (its DOM), without markup."""
    chromium = shutil.which("chromium")
    assert chromium, "Chromium is missing: apt-get install chromium (scripts/setup.sh installs it)"
    dom = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--window-size=1400,900", "--virtual-time-budget=5000",
         "--dump-dom", url],
        check=True, capture_output=True, text=True, timeout=120,
    ).stdout
    text = re.sub(r"<[^>]+>", " ", dom)
    return re.sub(r"\s+", " ", text.replace("&amp;", "&").replace("&#39;", "'").replace("&gt;", ">"))


def _fields(model: type[BaseModel], seen: set[type]) -> set[str]:
    """Every field name of ``model`` and of the sections under it."""
    names = set()
    for name, info in model.model_fields.items():
        if info.exclude:
            continue
        names.add(name)
        for arg in _flatten(info.annotation):
            if isinstance(arg, type) and issubclass(arg, BaseModel) and arg not in seen:
                seen.add(arg)
                names |= _fields(arg, seen)
    return names


def _flatten(annotation) -> list:
    args = typing.get_args(annotation)
    return [a for arg in args for a in _flatten(arg)] if args else [annotation]


def test_the_job_file_reference_lists_every_field_of_the_code(served, tmp_path):
    page = _rendered_text(f"{served}/job-file/", tmp_path / "chrome")
    assert "The job file" in page
    assert "num_trials" in page and "flush_timeout_s" in page
    missing = sorted(name for name in _fields(JobConfig, set()) if f"{name} " not in page)
    assert not missing, f"fields of lrsearch/job/config.py missing from the job file reference: {missing}"
    # descriptions come from the code's #: comments, defaults from the models
    assert "a search that ends while the tracking server is down" in page
    assert "sqlite:///mlflow.db" in page
    assert "bert" in page and "efficientnet" in page  # the search-space table from search_spaces/


def test_the_api_reference_shows_the_docstrings(served, tmp_path):
    page = _rendered_text(f"{served}/api/", tmp_path / "chrome")
    for name in ("lrsearch.search", "lrsearch.train", "lrsearch.export", "lrsearch.Trial", "lrsearch.Task",
                 "lrsearch.integrations.transformers.search", "lrsearch.integrations.lightning.search",
                 "lrsearch.optim.schedules", "build_scheduler", "lrsearch.range_test", "lr_range_test"):
        assert name in page, name
    assert "Run a job's search: range test -> Optuna (TPE or random) + ASHA on Ray Tune -> best config" in page
    assert "Search the learning-rate strategy of the Trainer" in page
    assert ":class:" not in page and ":func:" not in page  # Sphinx roles rendered as code


def test_the_benchmarks_headline_is_the_one_in_BENCHMARKS_md(served, tmp_path):
    text = (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8")
    headline = re.search(r"<!-- headline[^>]*-->\n(.*?)<!-- /headline -->", text, re.S).group(1)
    first_row = next(line for line in headline.splitlines() if line.startswith("| image |"))
    cells = [c.strip() for c in first_row.strip("|").split("|")]
    page = _rendered_text(f"{served}/benchmarks/", tmp_path / "chrome")
    assert " ".join(cells[:4]) in page
    full = _rendered_text(f"{served}/benchmarks-full/", tmp_path / "chrome")
    assert "Range test overhead" in full  # BENCHMARKS.md itself, on the site


def test_the_search_index_covers_the_generated_pages(site):
    index = (site / "search" / "search_index.json").read_text(encoding="utf-8")
    assert "flush_timeout_s" in index and "build_scheduler" in index


def test_every_relative_link_of_the_readme_and_the_docs_resolves():
    broken = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if "://" in target:
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken


def test_the_readme_stays_short():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 200

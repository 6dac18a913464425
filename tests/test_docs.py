"""The documentation builds without warnings, its guides run, and every docstring example works.

* ``sphinx-build -W --keep-going -b html`` on ``docs/`` (warnings are errors);
* ``sphinx-build -b doctest`` runs the guides' code blocks and commands (``make -C docs doctest``);
* ``doctest`` on every public module of ``likelihood_free`` and ``calm_models``: the ``Example:``
  sections of the API reference;
* every public module has an API page, and the results page includes Markdown (MyST) cleanly.

The Sphinx builds run in subprocesses with one torch thread, offline (``CALM_DOCS_OFFLINE=1``:
no intersphinx download) and with a temporary token cache.
"""

from __future__ import annotations

import doctest
import importlib
import io
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PACKAGES = ("likelihood_free", "calm_models")


def _public_modules() -> list[str]:
    names = []
    for package in PACKAGES:
        path = [str(ROOT / package)]
        names += [f"{package}.{m.name}" for m in pkgutil.iter_modules(path) if not m.name.startswith("_")]
    return sorted(names)


PUBLIC_MODULES = _public_modules()


def _sphinx_env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        CALM_DOCS_OFFLINE="1",
        CALM_CACHE=str(tmp / "token-cache"),
        MPLBACKEND="Agg",
        TQDM_DISABLE="1",
        PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])]),
    )
    return env


@pytest.fixture(scope="module")
def sphinx_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pytest.importorskip("sphinx", reason="the docs need the [dev] extra (sphinx, furo)")
    pytest.importorskip("furo", reason="the docs need the [dev] extra (sphinx, furo)")
    tmp = tmp_path_factory.mktemp("docs")
    return {"tmp": tmp, "doctrees": tmp / "doctrees"}


def _sphinx(builder: str, dirs: dict[str, Path], *extra: str) -> subprocess.CompletedProcess:
    out = dirs["tmp"] / builder
    cmd = [
        sys.executable,
        "-m",
        "sphinx",
        "-b",
        builder,
        "-d",
        str(dirs["doctrees"]),
        "-q",
        *extra,
        str(DOCS),
        str(out),
    ]
    return subprocess.run(cmd, cwd=ROOT, env=_sphinx_env(dirs["tmp"]), capture_output=True, text=True, timeout=600)


def test_html_builds_without_warnings(sphinx_dirs: dict[str, Path]) -> None:
    proc = _sphinx("html", sphinx_dirs, "-W", "--keep-going")
    assert proc.returncode == 0, f"sphinx-build -W failed:\n{proc.stderr}\n{proc.stdout}"
    html = sphinx_dirs["tmp"] / "html"
    for page in ("index", "quickstart", "toolkit", "training", "theory", "results"):
        assert (html / f"{page}.html").is_file(), page
    for module in PUBLIC_MODULES:
        assert (html / "api" / f"{module}.html").is_file(), module
    # Re-exported names resolve to the defining module's entry (docs/_ext/calm_docs.py).
    model_page = (html / "api" / "calm_models.model.html").read_text(encoding="utf-8")
    assert "likelihood_free.energy.html#likelihood_free.energy.energy_loss" in model_page


def test_guides_run(sphinx_dirs: dict[str, Path]) -> None:
    """Every ``doctest``/``testcode``/``command`` block of the guides, with checked output."""
    proc = _sphinx("doctest", sphinx_dirs, "-W", "--keep-going")
    report = sphinx_dirs["tmp"] / "doctest" / "output.txt"
    summary = report.read_text(encoding="utf-8") if report.is_file() else ""
    assert proc.returncode == 0, f"guide code failed:\n{summary}\n{proc.stderr}\n{proc.stdout}"
    assert " 0 failures in tests" in summary, summary
    for page in ("quickstart", "toolkit", "training", "theory"):
        assert f"Document: {page}" in summary, f"no code of {page}.rst was run:\n{summary}"


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_module_docstring_examples(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``doctest.testmod`` of one public module (the examples shown in the API reference)."""
    torch = pytest.importorskip("torch")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CALM_CACHE", str(tmp_path / "token-cache"))
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    report = io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for test in finder.find(module, name):
            runner.run(test, out=report.write)
    finally:
        torch.set_num_threads(threads)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}:\n" + (report.getvalue())


def test_every_public_module_has_an_api_page() -> None:
    pages = {p.stem for p in (DOCS / "api").glob("*.rst")} - {"index"}
    assert pages == set(PUBLIC_MODULES), (
        f"modules without a page: {sorted(set(PUBLIC_MODULES) - pages)}; "
        f"pages without a module: {sorted(pages - set(PUBLIC_MODULES))}"
    )
    index = (DOCS / "api" / "index.rst").read_text(encoding="utf-8")
    for module in PUBLIC_MODULES:
        text = (DOCS / "api" / f"{module}.rst").read_text(encoding="utf-8")
        assert f".. automodule:: {module}\n" in text, module
        assert f"\n   {module}\n" in index, f"{module} is not in the toctree of api/index.rst"


def test_results_include_builds_with_markdown_rst_or_nothing(tmp_path: Path) -> None:
    """``.. generated-include::`` (docs/results.rst) builds with a .md, an .rst or no file."""
    pytest.importorskip("sphinx")
    src = tmp_path / "src"
    (src / "_generated").mkdir(parents=True)
    (src / "conf.py").write_text('extensions = ["calm_docs"]\nexclude_patterns = ["_generated"]\n')
    page = (
        "{title}\n{rule}\n\nIntro.\n\n.. generated-include:: _generated/{name}\n\n"
        "   Placeholder for {name}.\n\nAfter\n-----\n\nThe end.\n"
    )
    toc = ".. toctree::\n\n   md\n   rst\n   none\n"
    (src / "index.rst").write_text("Index\n=====\n\n" + toc)
    for name, title in (("md", "Markdown"), ("rst", "Rest"), ("none", "Nothing")):
        (src / f"{name}.rst").write_text(page.format(title=title, rule="=" * len(title), name=name))
    (src / "_generated" / "md.md").write_text(
        "<!-- written by hand -->\n# Table\n\n| a | b |\n|---|---:|\n| 1 | 2 |\n"
        "| token \\| baseline | `3.90` |\n\n![plot](plot.png)\n\n## Sub\n\ntext_ here, a "
        "[link](https://arxiv.org/abs/2510.27688)\n- one_ item\n\n```bash\npython -m x\n```\n"
    )
    png = bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
        "1f15c4890000000d49444154789c6360000002000100e221bc330000000049454e44ae426082"
    )
    (src / "_generated" / "plot.png").write_bytes(png)
    (src / "_generated" / "rst.rst").write_text("Numbers\n-------\n\n* one\n* two\n")
    out = tmp_path / "html"
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(src), str(out)],
        env=_sphinx_env(tmp_path) | {"PYTHONPATH": str(DOCS / "_ext")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    md, rst, none = ((out / f"{n}.html").read_text(encoding="utf-8") for n in ("md", "rst", "none"))
    assert "<table" in md and "plot.png" in md and "text_ here" in md and "Placeholder" not in md
    assert "token | baseline" in md and "one_ item" in md
    assert "Numbers" in rst and "Placeholder" not in rst
    assert "Placeholder for none." in none

"""Executable documentation: every ```python block of README.md and docs/*.md runs, and the site builds strictly.

Blocks of one file run in order in one shared namespace, in a fresh temporary working directory, so a page reads
like one script. Shell commands belong in ```bash blocks and output in ```text blocks: those are not run.
"""

from __future__ import annotations

import html
import os
import re
import subprocess
import sys
import textwrap
import time
import traceback
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_TEST_COMMAND = 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest'

_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)")
# a block that only includes a file (pymdownx.snippets, the Examples page): the file runs in its own tests
_SNIPPET = re.compile(r'--8<-- "[^"]+"')


def python_blocks(text: str) -> list[tuple[int, str]]:
    """The ```python blocks of a markdown text: (1-based line of the opening fence, source), in order.

    The source is padded with blank lines so that line numbers in tracebacks are line numbers of the markdown file.
    Blocks indented inside list items are dedented. A block that only includes a file (``--8<-- "examples/x.py"``,
    pymdownx.snippets) is left out: that file is tested where it lives.
    """
    lines = text.splitlines()
    blocks: list[tuple[int, str]] = []
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        fence = match["fence"]
        end = i + 1
        while end < len(lines) and not lines[end].strip().startswith(fence):
            end += 1
        body = textwrap.dedent("\n".join(lines[i + 1 : end]))
        if match["info"].lower() in ("python", "py", "python3") and not _SNIPPET.fullmatch(body.strip()):
            blocks.append((i + 1, "\n" * (i + 1) + body + "\n"))
        i = end + 1
    return blocks


def test_python_blocks_parser() -> None:
    text = "x\n```python\na = 1\n```\n\n```bash\nls\n```\n- item\n\n    ```python\n    b = a + 1\n    ```\n"
    blocks = python_blocks(text)
    assert [line for line, _ in blocks] == [2, 11]
    namespace: dict[str, object] = {}
    for _, source in blocks:
        exec(compile(source, "<doc>", "exec"), namespace)
    assert namespace["b"] == 2


@pytest.mark.parametrize("path", DOC_FILES, ids=[str(p.relative_to(ROOT)) for p in DOC_FILES])
def test_python_blocks_run(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not path.exists():
        pytest.fail(f"{path.relative_to(ROOT)} does not exist")
    blocks = python_blocks(path.read_text(encoding="utf-8"))
    if not blocks:
        return
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace: dict[str, object] = {"__name__": "__main__"}
    rel = path.relative_to(ROOT)
    for line, source in blocks:
        failure = None
        try:
            exec(compile(source, str(path), "exec"), namespace)
        except KeyboardInterrupt:
            raise
        except BaseException as err:  # SystemExit from a script block fails too
            failure = f"{type(err).__name__}: {err}\n\n" + "".join(traceback.format_exception(err))
        if failure is not None:
            pytest.fail(f"{rel}: the python block at line {line} failed: {failure}", pytrace=False)


def test_readme_test_command_is_what_ci_runs() -> None:
    readme_lines = [line.strip() for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines()]
    assert README_TEST_COMMAND in readme_lines, f"README.md must contain the line {README_TEST_COMMAND!r}"
    ci_commands = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    assert ci_commands[-1] == README_TEST_COMMAND, (
        f".ci/run must end with README's test command {README_TEST_COMMAND!r}, it ends with {ci_commands[-1]!r}"
    )


def _nav_files(nav: object) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [name for item in nav for name in _nav_files(item)]
    if isinstance(nav, dict):
        return [name for value in nav.values() for name in _nav_files(value)]
    return []


def test_every_docs_page_is_in_the_nav() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    nav = set(_nav_files(config["nav"]))
    pages = {str(p.relative_to(ROOT / "docs")).replace(os.sep, "/") for p in (ROOT / "docs").rglob("*.md")}
    assert pages - nav == set(), f"pages missing from the mkdocs nav: {sorted(pages - nav)}"


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    for name in (
        "HeavyTailNoiseCallback",
        "PruneEvalCallback",
        "sample_stable",
        "add_heavy_tailed_noise",
        "evaluate_pruning_curve",
        "compressibility_report",
        "select_parameters",
        "BiasFreeMLP",
        "ClassificationDataModule",
    ):
        assert name in api, f"{name} is missing from the rendered API page: mkdocstrings did not render it"
    assert "Chambers-Mallows-Stuck" in api, "the docstring of lightning_heavytail.stable was not rendered"
    assert "::: lightning_heavytail" not in api, "an mkdocstrings directive was left unrendered"
    assert elapsed < 120, f"mkdocs build took {elapsed:.0f} s"
    # the home page shows the demo's figure, and the built site holds the image
    home = (site / "index.html").read_text(encoding="utf-8")
    assert 'src="img/demo_pruning_curves.png"' in home
    figure = (ROOT / "docs" / "img" / "demo_pruning_curves.png").read_bytes()
    assert (site / "img" / "demo_pruning_curves.png").read_bytes() == figure
    # the Examples page holds every example's source (included from examples/, so never out of date)
    examples = (site / "examples" / "index.html").read_text(encoding="utf-8")
    for script in sorted((ROOT / "examples").glob("*.py")):
        first_line = script.read_text(encoding="utf-8").splitlines()[0].strip('"')
        assert html.escape(first_line, quote=False)[:60] in examples, f"{script.name}'s source is not on the page"
    assert "--8<--" not in examples, "a snippet include was left unrendered"


def test_the_examples_page_lists_every_example_with_its_command_and_source() -> None:
    page = (ROOT / "docs" / "examples.md").read_text(encoding="utf-8")
    for script in sorted((ROOT / "examples").glob("*.py")):
        name = script.name
        assert f"## {name}" in page, f"docs/examples.md has no section for {name}"
        assert f"(#{name.replace('.', '')})" in page, f"the table of docs/examples.md does not link {name}"
        assert f"python examples/{name} " in page, f"docs/examples.md shows no command for {name}"
        assert f'--8<-- "examples/{name}"' in page, f"docs/examples.md does not include the source of {name}"


def test_readme_says_how_to_get_the_cpu_wheel_elsewhere() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in readme
    assert "pip install torch==2.13.0 && pip install -e . && lightning-heavytail demo" in readme

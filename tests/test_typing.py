"""A user's type checker reads the package: mypy and pyright on the typed sample in tests/typing.

``ok_*.py`` is user code that must check with no errors, every README example among
it; ``mistakes.py`` holds mistakes that must each be reported, with mypy's error
code marked on their line (``# E: <code>``), and nothing else: by mypy once, with
that code; by pyright at least once (it may say more than one thing about a call).
Both run in a subprocess from the repository root with the repository on
``PYTHONPATH``, so they read the package as an installed one, as after the README's
editable install; pyright reads ``pyrightconfig.json`` there and runs offline.
"""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys
from typing import Dict, List, Tuple

import pytest

from tests.support import ROOT
from tests.support.processes import python_environment, run_python
from tests.support.readme import README, python_blocks

pytest.importorskip("mypy")
pytestmark = pytest.mark.timeout(600)

SAMPLE = ROOT / "tests" / "typing"
OK_FILES = sorted(SAMPLE.glob("ok_*.py"))
MISTAKES = SAMPLE / "mistakes.py"

ERROR = re.compile(r"^(?P<path>[^:\n]+):(?P<line>\d+): error: .*\[(?P<code>[a-z-]+)\]$", re.M)
MARK = re.compile(r"#\s*E:\s*(?P<code>[a-z-]+)\s*$")
# What the ok_readme_*.py files hold before the README's code: comment lines, a blank.
HEADER = re.compile(r"\A(?:#[^\n]*\n)+\n")

Errors = Dict[Tuple[str, int], List[str]]


def run_mypy(cache_dir: pathlib.Path, *paths: pathlib.Path) -> Tuple[subprocess.CompletedProcess, Errors]:
    """mypy's result on ``paths``, and its errors by (file name, line): their codes."""
    result = run_python(
        "-m", "mypy",
        "--config-file", "setup.cfg",
        "--cache-dir", str(cache_dir),
        "--no-pretty", "--no-color-output", "--show-error-codes",
        *(str(path.relative_to(ROOT)) for path in paths),
        env=python_environment(),
        timeout=540,
    )
    errors: Errors = {}
    for found in ERROR.finditer(result.stdout):
        key = (pathlib.Path(found["path"]).name, int(found["line"]))
        errors.setdefault(key, []).append(found["code"])
    return result, errors


def run_pyright() -> Tuple[subprocess.CompletedProcess, Errors]:
    """pyright's result on tests/typing, and its errors by (file name, line): their rules."""
    result = run_python(
        "-m", "pyright",
        # JSON output also skips the wrapper's check for a newer release online.
        "--outputjson",
        "--project", "pyrightconfig.json",
        "--pythonpath", sys.executable,
        env=python_environment(PYRIGHT_PYTHON_IGNORE_WARNINGS="1"),
        timeout=540,
    )
    try:
        report = json.loads(result.stdout)
    except ValueError:
        pytest.fail(f"pyright did not run:\n{result.stdout}\n{result.stderr}")
    errors: Errors = {}
    for found in report["generalDiagnostics"]:
        if found["severity"] == "error":
            key = (pathlib.Path(found["file"]).name, found["range"]["start"]["line"] + 1)
            errors.setdefault(key, []).append(found.get("rule", "error"))
    return result, errors


def describe(errors: Errors) -> str:
    return "\n".join(f"{name}:{line}: {codes}" for (name, line), codes in sorted(errors.items()))


def marked_mistakes() -> Dict[Tuple[str, int], List[str]]:
    """The mistakes marked in mistakes.py, by (file name, line): mypy's expected code."""
    expected = {}
    for number, text in enumerate(MISTAKES.read_text().splitlines(), start=1):
        mark = MARK.search(text)
        if mark:
            expected[(MISTAKES.name, number)] = [mark["code"]]
    assert len(expected) >= 10, "mistakes.py should mark its mistakes with `# E: <code>`"
    return expected


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tmp_path_factory.mktemp("mypy-cache")


@pytest.fixture(scope="module")
def ok_report(cache_dir: pathlib.Path) -> Tuple[subprocess.CompletedProcess, Errors]:
    return run_mypy(cache_dir, *OK_FILES)


@pytest.fixture(scope="module")
def pyright_report() -> Tuple[subprocess.CompletedProcess, Errors]:
    pytest.importorskip("pyright")
    return run_pyright()


def test_the_sample_holds_every_readme_example():
    blocks = {block.code for block in python_blocks(README.read_text())}
    sample = {
        HEADER.sub("", path.read_text()) for path in OK_FILES if path.name.startswith("ok_readme_")
    }
    assert blocks, "the README has no Python example"
    assert sample == blocks, "tests/typing/ok_readme_*.py must hold the README's examples as written"


@pytest.mark.parametrize(
    "path",
    [
        pytest.param(path, id=path.stem)
        for path in OK_FILES
    ],
)
def test_user_code_checks_with_no_errors(path, ok_report):
    result, errors = ok_report
    assert result.returncode in (0, 1), result.stderr  # 2: mypy itself failed
    found = {line: codes for (name, line), codes in errors.items() if name == path.name}
    assert not found, f"mypy reported errors in {path.name}:\n{result.stdout}"


def test_every_marked_mistake_is_reported_once_and_nothing_else(cache_dir):
    expected = marked_mistakes()
    result, errors = run_mypy(cache_dir, MISTAKES)
    assert result.returncode == 1, result.stdout + result.stderr
    assert errors == expected, result.stdout


@pytest.mark.parametrize(
    "path",
    [
        pytest.param(path, id=path.stem)
        for path in OK_FILES
    ],
)
def test_user_code_checks_with_no_errors_in_pyright(path, pyright_report):
    result, errors = pyright_report
    found = {key: rules for key, rules in errors.items() if key[0] == path.name}
    assert not found, f"pyright reported errors in {path.name}:\n{describe(found)}"


def test_pyright_reports_every_marked_mistake_and_nothing_else(pyright_report):
    result, errors = pyright_report
    assert result.returncode == 1, result.stdout + result.stderr
    found = {key: rules for key, rules in errors.items() if key[0] == MISTAKES.name}
    expected = marked_mistakes()
    missed = sorted(line for name, line in expected if (name, line) not in found)
    unmarked = {key: rules for key, rules in found.items() if key not in expected}
    assert not missed, f"pyright did not report the mistakes on lines {missed} of {MISTAKES.name}"
    assert not unmarked, f"pyright reported unmarked errors:\n{describe(unmarked)}"

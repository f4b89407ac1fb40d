"""The README's code runs: every ```python block, each as a script in a child process.

A block is skipped by design when the line before its fence (blank lines aside) is
``<!-- no-test -->``, for fragments that are not whole programs. Blocks are
independent: each must import what it uses.
"""

from __future__ import annotations

import pathlib
import textwrap
from typing import List, NamedTuple

import pytest

from tests.support.flows_subprocess import run_python

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
NO_TEST = "<!-- no-test -->"
BLOCK_TIMEOUT = 240.0


class Block(NamedTuple):
    line: int  # of the opening fence, 1-based
    code: str


def python_blocks(text: str) -> List[Block]:
    """The README's ```python blocks, in order, without those marked ``<!-- no-test -->``."""
    blocks = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        fence = lines[index].strip()
        if not fence.startswith("```"):
            index += 1
            continue
        opening = index
        end = next(
            (i for i in range(opening + 1, len(lines)) if lines[i].strip() == "```"), len(lines)
        )
        if fence[3:].strip() == "python" and not _marked_no_test(lines, opening):
            code = textwrap.dedent("\n".join(lines[opening + 1:end]))
            blocks.append(Block(opening + 1, code + "\n"))
        index = end + 1
    return blocks


def _marked_no_test(lines: List[str], fence_index: int) -> bool:
    for previous in reversed(lines[:fence_index]):
        if previous.strip():
            return previous.strip() == NO_TEST
    return False


BLOCKS = python_blocks(README.read_text()) if README.exists() else []


def test_the_readme_shows_python_code_to_run():
    assert README.exists(), f"{README} is missing"
    assert BLOCKS, f"{README} has no ```python block to run"


@pytest.mark.timeout(BLOCK_TIMEOUT + 60)
@pytest.mark.parametrize("block", [pytest.param(b, id=f"line-{b.line}") for b in BLOCKS])
def test_a_readme_block_runs(block, tmp_path):
    script = tmp_path / f"readme_line_{block.line}.py"
    script.write_text(block.code)
    result = run_python(script, cwd=tmp_path, timeout=BLOCK_TIMEOUT)
    assert result.returncode == 0, (
        f"README.md block at line {block.line} exited with {result.returncode}\n"
        f"--- code ---\n{block.code}--- stdout ---\n{result.stdout}--- stderr ---\n{result.stderr}"
    )


def test_blocks_are_found_and_marked_ones_are_left_out():
    text = "\n".join(
        [
            "# Title",
            "```python",
            "print('first')",
            "```",
            "<!-- no-test -->",
            "",
            "```python",
            "fragment(",
            "```",
            "```bash",
            "pip install taskrunners",
            "```",
            "  ```python",
            "  print('indented')",
            "  ```",
        ]
    )
    assert python_blocks(text) == [
        Block(2, "print('first')\n"),
        Block(13, "print('indented')\n"),
    ]

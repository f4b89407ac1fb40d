"""The README's code runs: every ```python block, each as a script in a child process.

Blocks marked ``<!-- no-test -->`` are left out (tests/support/readme.py). Blocks are
independent: each must import what it uses.
"""

from __future__ import annotations

import pytest

from tests.support.processes import run_python
from tests.support.readme import README, Block, python_blocks

BLOCK_TIMEOUT = 240.0
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

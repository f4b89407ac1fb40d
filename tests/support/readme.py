"""The README's Python examples, as the README and typing tests read them.

A block is left out by design when the line before its fence (blank lines aside) is
``<!-- no-test -->``, for fragments that are not whole programs.
"""

from __future__ import annotations

import textwrap
from typing import List, NamedTuple

from tests.support import ROOT

README = ROOT / "README.md"
NO_TEST = "<!-- no-test -->"


class Block(NamedTuple):
    line: int  # of the opening fence, 1-based
    code: str


def python_blocks(text: str) -> List[Block]:
    """The ```python blocks of ``text``, in order, without those marked ``<!-- no-test -->``."""
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

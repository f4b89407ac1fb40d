"""The docstring of an async facade class, made from its blocking twin's.

A twin's docstring is its summary, an example, and then its parameters and what it
does; a facade's is the same, with the example run in a coroutine.
"""

from __future__ import annotations

import inspect
import re

__all__ = ["facade_doc"]

# The example in a facade's docstring: run as a doctest where the twin's is one.
_EXAMPLE = """\
>>> from taskrunners.states import Completed
>>> async def main():
...     async with {runner}.start() as runner:
...         future = await runner.submit(TaskRun(), lambda x: Completed(data=x * 2), {{"x": 21}})
...         print((await runner.wait(future)).result())
>>> anyio.run(main)
42"""
_LITERAL_EXAMPLE = """\
Example, in a coroutine (``Completed`` comes from :mod:`taskrunners.states`)::

    async with {runner}.start() as runner:
        future = await runner.submit(TaskRun(), lambda x: Completed(data=x * 2), {{"x": 21}})
        (await runner.wait(future)).result()  # 42"""

_CONSTRUCTED = re.compile(r"with (\w+\(.*\))\.start\(\) as runner:")


def facade_doc(twin: type, more: str = "") -> str:
    """The docstring of the facade over ``twin``: the twin's, its example made async,
    followed by ``more``.

    The twin's example follows its summary (``>>>`` lines, or ``Example::`` and its
    block) and constructs the runner in ``with <constructor>.start() as runner:``.
    """
    summary, _, body = inspect.cleandoc(twin.__doc__ or "").partition("\n\n")
    paragraphs = body.split("\n\n")
    literal = paragraphs[0].endswith("::")
    example = "\n\n".join(paragraphs[: 2 if literal else 1])
    del paragraphs[: 2 if literal else 1]
    constructed = _CONSTRUCTED.search(example)
    if constructed is None:
        raise ValueError(f"no `with ....start() as runner:` in the example of {twin.__name__}")
    facade = (
        f"The async facade over :class:`taskrunners.sync.{twin.__name__}`, for asyncio\n"
        "and trio; that blocking twin serves code with no event loop."
    )
    example = (_LITERAL_EXAMPLE if literal else _EXAMPLE).format(runner=constructed[1])
    parts = [summary, example, facade, *paragraphs, *([inspect.cleandoc(more)] if more else [])]
    return "\n\n".join(parts) + "\n"

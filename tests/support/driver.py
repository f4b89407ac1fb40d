"""One way to drive a runner from test code, whatever its mode.

The blocking twin is called directly; the async facade is called through an anyio
blocking portal running asyncio or trio, so one test body covers all three.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Dict, Iterator, Optional

from anyio.from_thread import BlockingPortal, start_blocking_portal

from taskrunners import PrefectFuture, TaskRun
from taskrunners.states import State


class Driver:
    def __init__(self, runner: Any, portal: Optional[BlockingPortal], mode: str) -> None:
        self.runner = runner
        self.portal = portal
        self.mode = mode

    @property
    def blocking(self) -> bool:
        return self.portal is None

    @contextlib.contextmanager
    def start(self) -> Iterator[Any]:
        if self.portal is None:
            with self.runner.start() as started:
                yield started
        else:
            with self.portal.wrap_async_context_manager(self.runner.start()) as started:
                yield started

    def submit(
        self,
        run_fn: Callable[..., Any],
        run_kwargs: Optional[Dict[str, Any]] = None,
        task_run: Optional[TaskRun] = None,
        timeout_seconds: Optional[float] = None,
    ) -> PrefectFuture:
        task_run = task_run or TaskRun()
        if self.portal is None:
            return self.runner.submit(
                task_run, run_fn, run_kwargs or {}, timeout_seconds=timeout_seconds
            )
        submit = functools.partial(self.runner.submit, timeout_seconds=timeout_seconds)
        return self.portal.call(submit, task_run, run_fn, run_kwargs or {})

    def wait(self, future: PrefectFuture, timeout: Optional[float] = None) -> Optional[State]:
        if self.portal is None:
            return self.runner.wait(future, timeout)
        return self.portal.call(self.runner.wait, future, timeout)

    def run(self, run_fn: Callable[..., Any], run_kwargs: Optional[Dict[str, Any]] = None) -> State:
        """Submit one call and wait for its State."""
        return self.wait(self.submit(run_fn, run_kwargs))

    def for_runner(self, runner: Any) -> Driver:
        """Another runner (e.g. an unpickled copy), driven in the same mode and portal."""
        return Driver(runner, self.portal, self.mode)


@contextlib.contextmanager
def driving(runner: Any, mode: str) -> Iterator[Driver]:
    """Drive ``runner`` (a blocking twin for "sync", else a facade runner) in ``mode``:
    directly, or through a portal running asyncio or trio."""
    if mode == "sync":
        yield Driver(runner, None, mode)
        return
    with start_blocking_portal(backend=mode) as portal:
        yield Driver(runner, portal, mode)

"""A runner's settings read back, with their types, from the blocking twin and the
async facade alike: this must check with no errors."""

from typing import Any, Callable, Dict, Optional, Tuple, Union

from typing_extensions import Literal, assert_type

import taskrunners
import taskrunners.sync

Batch = Union[int, Literal["auto"]]


def concurrent(facade: taskrunners.ConcurrentTaskRunner, twin: taskrunners.sync.ConcurrentTaskRunner) -> None:
    assert_type(facade.max_workers, Optional[int])
    assert_type(twin.max_workers, Optional[int])


def parallel(facade: taskrunners.ParallelTaskRunner, twin: taskrunners.sync.ParallelTaskRunner) -> None:
    for runner in (facade, twin):
        assert_type(runner.max_workers, Optional[int])
        assert_type(runner.initializer, Optional[Callable[..., Any]])
        assert_type(runner.initargs, Tuple[Any, ...])
        assert_type(runner.env, Optional[Dict[str, str]])
        assert_type(runner.batch_size, Batch)


def dask(facade: taskrunners.DaskTaskRunner, twin: taskrunners.sync.DaskTaskRunner) -> None:
    for runner in (facade, twin):
        assert_type(runner.address, Optional[str])
        assert_type(runner.cluster_class, Optional[Callable[..., Any]])
        assert_type(runner.cluster_kwargs, Dict[str, Any])
        assert_type(runner.adapt_kwargs, Dict[str, Any])
        assert_type(runner.client_kwargs, Dict[str, Any])
        assert_type(runner.connect_timeout, float)
        assert_type(runner.batch_size, Batch)


def ray(facade: taskrunners.RayTaskRunner, twin: taskrunners.sync.RayTaskRunner) -> None:
    for runner in (facade, twin):
        assert_type(runner.address, Optional[str])
        assert_type(runner.init_kwargs, Dict[str, Any])
        assert_type(runner.remote_options, Dict[str, Any])
        assert_type(runner.batch_size, Batch)

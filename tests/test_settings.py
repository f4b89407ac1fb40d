"""A runner's settings and docstring, written once on the blocking twin and shown by the
async facade: the same constructor, the same attributes with the same docs, read-only on
the facade, plain attributes on the twin."""

from __future__ import annotations

import inspect
import pickle
import re

import cloudpickle
import pytest

import taskrunners
import taskrunners.sync
from taskrunners._core.settings import Setting

NAMES = ["SequentialTaskRunner", "ConcurrentTaskRunner", "ParallelTaskRunner", "DaskTaskRunner", "RayTaskRunner"]

#: What each kind is built with here (nothing that imports distributed or ray).
ARGUMENTS = {
    "SequentialTaskRunner": {},
    "ConcurrentTaskRunner": {"max_workers": 3},
    "ParallelTaskRunner": {"max_workers": 2, "initargs": (1,), "env": {"A": "1"}, "batch_size": 4},
    "DaskTaskRunner": {"cluster_kwargs": {"processes": True}, "connect_timeout": 5, "batch_size": 1},
    "RayTaskRunner": {"address": "127.0.0.1:6379", "remote_options": {"num_cpus": 1}},
}


def settings_of(twin_class):
    return {name: value for name, value in vars(twin_class).items() if isinstance(value, Setting)}


@pytest.mark.parametrize("name", NAMES)
def test_the_facade_takes_the_twins_parameters(name):
    facade, twin = getattr(taskrunners, name), getattr(taskrunners.sync, name)
    assert inspect.signature(facade) == inspect.signature(twin)
    assert set(settings_of(twin)) <= set(inspect.signature(twin).parameters)


@pytest.mark.parametrize("name", NAMES)
def test_the_facade_shows_each_setting_of_the_twin_read_only_with_its_doc(name):
    facade_class, twin_class = getattr(taskrunners, name), getattr(taskrunners.sync, name)
    facade = facade_class(**ARGUMENTS[name])
    twin = twin_class(**ARGUMENTS[name])
    for setting_name, setting in settings_of(twin_class).items():
        forwarded = vars(facade_class)[setting_name]
        assert forwarded.__doc__ == setting.__doc__ and setting.__doc__
        assert getattr(facade, setting_name) == getattr(twin, setting_name)
        assert getattr(facade, setting_name) is getattr(facade._core, setting_name)
        with pytest.raises(AttributeError, match=f"property '{setting_name}' of '{name}' object has no setter"):
            setattr(facade, setting_name, None)


@pytest.mark.parametrize("name", NAMES)
def test_a_twin_keeps_its_settings_as_plain_attributes_through_pickling(name):
    twin = getattr(taskrunners.sync, name)(**ARGUMENTS[name])
    for setting_name in settings_of(type(twin)):
        assert vars(twin)[setting_name] is getattr(twin, setting_name)
    for dumps, loads in ((pickle.dumps, pickle.loads), (cloudpickle.dumps, cloudpickle.loads)):
        copy = loads(dumps(twin))
        assert {key: vars(copy)[key] for key in settings_of(type(twin))} == {
            key: vars(twin)[key] for key in settings_of(type(twin))
        }


@pytest.mark.parametrize("name", NAMES)
def test_the_facade_docstring_is_the_twins_with_an_async_example(name):
    facade, twin = getattr(taskrunners, name), getattr(taskrunners.sync, name)
    facade_doc, twin_doc = inspect.getdoc(facade), inspect.getdoc(twin)
    assert facade_doc.splitlines()[0] == twin_doc.splitlines()[0]
    constructed = re.search(r"with (\w+\(.*\))\.start\(\) as runner:", twin_doc)[1]
    assert f"async with {constructed}.start() as runner:" in facade_doc
    assert f"taskrunners.sync.{name}" in facade_doc
    for paragraph in twin_doc.split("\n\n"):
        if paragraph.startswith(":param") or paragraph.startswith(":raises"):
            assert paragraph in facade_doc

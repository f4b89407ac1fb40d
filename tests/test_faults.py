"""Bad input, fuzzed: whatever a run_fn does, wait gives a State with a useful message."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taskrunners.states import State
from tests.support import payloads

pytestmark = pytest.mark.timeout(300)

behaviours = st.one_of(
    st.tuples(st.just("raise"), st.sampled_from(sorted(payloads.RAISABLE))),
    st.tuples(
        st.sampled_from(
            ["raise-unpicklable-args", "return-unpicklable", "return-non-state", "fail-with-unpicklable"]
        ),
        st.just("ValueError"),
    ),
)


def test_wait_always_gives_a_state_with_a_message(driver):
    with driver.start():

        @settings(
            max_examples=12,
            deadline=None,
            derandomize=True,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        )
        @given(behaviour=behaviours, use_async=st.booleans(), message=st.text(max_size=20))
        def check(behaviour, use_async, message):
            how, name = behaviour
            run_fn = payloads.async_misbehave if use_async else payloads.misbehave
            state = driver.wait(driver.submit(run_fn, {"how": how, "name": name, "message": message}), timeout=120)
            assert isinstance(state, State), f"{how}/{name} gave {state!r}"
            if how == "return-unpicklable" and state.is_completed():
                return  # an in-process runner hands the lock back as it is
            assert not state.is_completed(), f"{how}/{name} gave {state!r}"
            assert isinstance(state.message, str) and state.message, f"{how}/{name}: no message"

        check()
        # The runner still works after all that.
        assert driver.run(payloads.return_value, {"value": "still here"}).result() == "still here"

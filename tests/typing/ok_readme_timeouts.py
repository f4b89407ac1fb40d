# The README's example under "Timeouts and stuck calls", exactly as written there
# (tests/test_typing.py checks that they stay the same). It is untyped, as much
# user code is; what it calls in taskrunners is checked all the same.
# mypy: allow-untyped-defs, allow-incomplete-defs

import time

from taskrunners import flow, task


@task(timeout_seconds=1, retries=1)
def stuck():
    time.sleep(60)


@flow
def fan_out():
    return stuck.submit().wait().name  # the name of the task run's State


if __name__ == "__main__":
    print(fan_out().result())  # TimedOut, after about 2 s: two tries of 1 s each

# The README's example under "Flows and tasks", exactly as written there
# (tests/test_typing.py checks that they stay the same). It is untyped, as much
# user code is; what it calls in taskrunners is checked all the same.
# mypy: allow-untyped-defs, allow-incomplete-defs

from typing import List

from taskrunners import DaskTaskRunner, ParallelTaskRunner, SequentialTaskRunner, flow, task


@task
def say_hello(name):
    print(f"hello {name}")


@task
def say_goodbye(name):
    print(f"goodbye {name}")


@flow(task_runner=SequentialTaskRunner())
def greetings(names: List[str]):
    for name in names:
        say_hello(name)
        say_goodbye(name)


if __name__ == "__main__":  # the process-based runners start workers
    state = greetings(["arthur", "trillian", "ford", "marvin"])  # in order
    print(state)  # Completed()

    greetings.task_runner = ParallelTaskRunner(max_workers=2)
    state = greetings(["arthur", "trillian", "ford", "marvin"])  # interleaved
    print(state.is_completed())  # True

    greetings.task_runner = DaskTaskRunner()
    state = greetings(["arthur", "trillian", "ford", "marvin"])  # interleaved
    print(state.is_completed())  # True

"""What the tests share: runner kinds, payloads, scripts run in subprocesses, helpers."""

import pathlib

# The repository: scripts run from here, and child processes import the package from here.
ROOT = pathlib.Path(__file__).resolve().parents[2]

"""The machine a run measured on: what it is, and the line that says so under tables
and charts."""

from __future__ import annotations

import os
import pathlib
import platform
import subprocess
from typing import Any, Dict, Optional

__all__ = ["machine_info", "machine_line"]

_PACKAGES = (
    "taskrunners", "anyio", "sniffio", "cloudpickle", "loky", "joblib", "dask", "distributed",
    "ray", "rich", "matplotlib", "prefect", "prefect-dask", "prefect-ray",
)


def machine_info(workers: int) -> Dict[str, Any]:
    """The machine, the interpreter and the package versions of this run."""
    from importlib import metadata

    packages = {}
    for name in _PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    return {
        "platform": platform.platform(),
        "system": platform.system(),
        "architecture": platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": workers,
        "memory_bytes": _memory_bytes(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "packages": packages,
        "git_commit": _git_commit(),
    }


def _cpu_model() -> Optional[str]:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _memory_bytes() -> Optional[int]:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _git_commit() -> Optional[str]:
    root = pathlib.Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty"],
            capture_output=True, text=True, timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def machine_line(machine: Dict[str, Any]) -> str:
    memory = machine.get("memory_bytes")
    parts = [
        f"{machine.get('usable_cpus')} usable CPUs ({machine.get('cpu_count')} online)",
        machine.get("cpu_model") or "",
        f"{memory / 2**30:.0f} GiB" if memory else "",
        machine.get("platform") or "",
        f"{machine.get('python_implementation', 'Python')} {machine.get('python')}",
    ]
    before, after = machine.get("load_average_before"), machine.get("load_average_after")
    if before and after:
        # Other processes on the machine make every number noisier: say how busy it was.
        parts.append(f"load average {before[0]:.1f} → {after[0]:.1f}")
    return " · ".join(p for p in parts if p)

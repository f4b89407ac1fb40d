"""Entry point of ``python -m benchmarks``.

Worker processes started with "spawn" import this module again under another name:
everything runs behind the ``__main__`` guard.
"""

if __name__ == "__main__":
    import sys

    from benchmarks.cli import main

    sys.exit(main())

"""Run kitci's command line: `python -m kitci serve ...`."""

from kitci._service import main

if __name__ == "__main__":
    raise SystemExit(main())

"""``python -m modal_llm.server``: run the reference endpoint in the foreground."""

from ._cmdline import main

if __name__ == "__main__":
    raise SystemExit(main())

"""``python -m modal_llm.cli``: the ``modal-llm`` command."""

from modal_llm.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

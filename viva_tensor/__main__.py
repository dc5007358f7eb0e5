"""``python -m viva_tensor``: the ``viva-tensor`` command (with no arguments, the report)."""

from viva_tensor.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

"""``python -m monai_effq.overlays [name]``: print an overlay's path, or every overlay with what it does."""

from __future__ import annotations

import sys

from monai_effq.overlays import OVERLAYS, overlay_path
from monai_effq.utils.errors import UserInputError

__all__ = ["main"]


def main(argv: list[str]) -> int:
    """Print the path of the overlay named in ``argv`` (one line, for ``$(...)``), or list them all.

    Args:
        argv: the command-line arguments after the module name.

    Returns:
        the exit status.
    """
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m monai_effq.overlays [name]: the path of one overlay, for $(...); without a name, all of them")
        for name, what in OVERLAYS.items():
            print(f"{name}: {overlay_path(name)}\n    {what}")
        return 0
    try:
        print(overlay_path(argv[0]))
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

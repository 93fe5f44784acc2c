"""shardtune's own notes to the user (a fallback taken, a checkpoint that cannot be verified):
plain ``note: ...`` lines on stderr from the main rank.

Not ``warnings.warn``: Python prints a warning with its category, file and source line, once per
rank, which a user cannot tell from a real problem in a library; and a warning filter (``-W
error``) would turn a note into a crash.
"""

from __future__ import annotations

import os
import sys


def note(message: str) -> None:
    """Print ``note: message`` on stderr, in the main rank only (torchrun's ``RANK`` 0, or no torchrun)."""
    if os.environ.get("RANK", "0") != "0":
        return
    print(f"note: {message}", file=sys.stderr, flush=True)

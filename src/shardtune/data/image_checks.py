"""The load-time image check of a vision split, divided among the ranks.

Every image of a vision split is decoded once at load time, so that a corrupt or truncated one is a
bad row (skipped with ``--skip_bad_rows``, or an error that names it) before training starts, not a
crash mid-epoch. Each rank checking every image cost every rank the whole split's reads and
decodes. Now rank ``r`` of ``n`` checks the rows ``i`` with ``i % n == r`` (positions in the
split), the ranks exchange what they found — (row, image, message) for each failed image, a short
list — and every rank then encodes all rows with the agreed findings: the same rows dropped, with
the same messages and counts, as one process checking every image. The exchange is injected
(:class:`Share`'s ``gather``, the recipe's ``all_gather_object``), so this layer knows nothing of
process groups; the default is one process, which checks everything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from ..config.errors import ShardtuneError
from .images import ImageRef, image_problem_of, is_pil
from .rows import BadRow

Gather = Callable[[Any], list]  # this rank's object -> every rank's, in rank order
Check = Callable[[ImageRef, int], None]  # raises BadRow for a row's image k that failed the check


@dataclass(frozen=True)
class Share:
    """Which rows this rank checks, and how the ranks exchange what they found."""

    rank: int = 0
    world_size: int = 1
    gather: Optional[Gather] = None  # None: one process (world_size 1)

    def owns(self, i: int) -> bool:
        return i % self.world_size == self.rank

    def exchange(self, mine: Any) -> list:
        if self.world_size == 1:
            return [mine]
        everyone = self.gather(mine) if self.gather is not None else None
        if everyone is None or len(everyone) != self.world_size:
            raise ShardtuneError(  # a wiring error, not the user's: say what is wrong
                f"The image check of rank {self.rank} of {self.world_size} needs the other ranks' findings, "
                f"but its exchange returned {'nothing' if everyone is None else f'{len(everyone)} parts'}.")
        return everyone


ONE_PROCESS = Share()


@dataclass
class ImageVerdicts:
    """What the check found: row -> (the first failing image, its BadRow message)."""

    problems: dict[int, tuple[int, str]]
    checked: int  # images this rank checked (its share's)

    def check_of(self, i: int) -> Check:
        """The check of row ``i``'s images as every rank applies it: raise where the owner found a problem."""
        found = self.problems.get(i)

        def check(ref: ImageRef, k: int) -> None:
            if found is not None and found[0] == k:
                raise BadRow(found[1])

        return check


def check_shared(rows: Sequence[Any], image_refs: Callable[[Any], list], share: Share = ONE_PROCESS) -> ImageVerdicts:
    """Check the images of this rank's share of ``rows`` (``image_refs(row)``: the row's image
    references in order, BadRow when it has none that can be made) and exchange the findings."""
    mine: list[tuple[int, int, str]] = []
    checked = 0
    for i in range(share.rank, len(rows), share.world_size):
        try:
            refs = image_refs(rows[i])
        except Exception:  # noqa: BLE001 - raised again when the row is encoded, the same way on
            continue       # every rank (raising here, on the owner only, would leave the others waiting)
        for k, ref in enumerate(refs):
            problem = image_problem_of(ref, k)
            checked += not is_pil(ref)  # a decoded image passes unread
            if problem:  # encoding stops at a row's first failing image
                mine.append((i, k, problem))
                break
    problems = {i: (k, message) for part in share.exchange(mine) for i, k, message in part}
    return ImageVerdicts(problems=problems, checked=checked)

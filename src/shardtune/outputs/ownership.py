"""What shardtune owns in an output directory, and the rule for writing into one.

shardtune writes only into a directory that does not exist, is empty, or holds only what an
earlier shardtune run wrote there. A marker file (``.shardtune-files.json``) lists the top-level
entries shardtune wrote (a trailing ``/`` marks a folder it owns whole, such as ``merged/`` or
``checkpoints/``); a rerun or ``--resume`` into its own output is therefore allowed, and anything
else is refused *before* any work, naming the foreign files. With the overwrite flag shardtune
still replaces and removes only entries it owns: foreign files are left where they are (and
named, since ``from_pretrained`` may read them). The directories a run reads from
(``--model_name``, ``--tokenizer_name``, ``--from_peft_checkpoint``) are never an output.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional

from ..config.errors import ShardtuneError
from .atomic import TEMP_PATTERN, atomic_write, fsync_path
from .digests import DamagedFiles, digest_files, files_of, is_weight_file, problems_of

MARKER = ".shardtune-files.json"
# The lock a run holds on its output folder (output_lock.py): shardtune's, never a foreign file.
LOCK = ".shardtune-lock"


def owned(directory: str | Path) -> set[str]:
    """Top-level entries shardtune recorded writing in ``directory`` (empty without a marker)."""
    path = Path(directory) / MARKER
    if not path.is_file():
        return set()
    try:
        data = json.loads(path.read_text())
        return {str(name) for name in data["entries"]}
    except (OSError, ValueError, KeyError, TypeError):
        raise ShardtuneError(
            f"{path} (the list of files shardtune wrote in {directory}) is damaged, so it is unknown "
            "which files there are shardtune's. Move the directory's files you want to keep, or "
            "delete the marker and pass the overwrite option.") from None


def _is_owned(entry: Path, names: set[str]) -> bool:
    name = entry.name
    # the name only shardtune uses for its in-progress writes (left behind by a crash mid-save)
    if name in (MARKER, LOCK) or fnmatch.fnmatch(name, TEMP_PATTERN):
        return True
    return (name + "/" if entry.is_dir() else name) in names


def foreign_entries(directory: str | Path) -> list[str]:
    """Top-level entries of ``directory`` that shardtune did not write (sorted)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    names = owned(directory)
    return sorted(e.name + ("/" if e.is_dir() else "") for e in directory.iterdir() if not _is_owned(e, names))


def recorded_digests(directory: str | Path) -> dict[str, dict]:
    """Size and SHA-256 of each file shardtune wrote directly in ``directory``, as its marker
    records them (empty for a directory written before digests were recorded, or not by shardtune)."""
    path = Path(directory) / MARKER
    if not path.is_file():
        return {}
    owned(directory)  # a damaged marker is a clear error
    digests = json.loads(path.read_text()).get("digests")
    return digests if isinstance(digests, dict) else {}


def verify_recorded(directory: str | Path, log: Callable[[str], None] = print) -> bool:
    """Check the files of ``directory`` against the digests its marker records. A weight file
    that differs is a :class:`DamagedFiles` error (nothing may be loaded from it); another file
    that differs (``config.json``, tokenizer files: users edit them) is reported through ``log``.
    False when nothing is recorded (not written by shardtune, or before digests were recorded)."""
    directory = Path(directory)
    recorded = recorded_digests(directory)
    if not recorded:
        return False
    weights = [n for n in recorded if is_weight_file(n)]
    damaged = problems_of(directory, recorded, weights)
    if damaged:
        raise DamagedFiles(directory, damaged, "Nothing was loaded from it. Restore it from a good copy, or "
                           "export or convert it again from the run's checkpoint.")
    for problem in problems_of(directory, recorded, [n for n in recorded if n not in weights]):
        log(f"note: {directory}: {problem} (edited since shardtune wrote it?)")
    return True


def record(directory: str | Path, added: Iterable[str] = (), removed: Iterable[str] = (),
           digests: Optional[Mapping[str, dict]] = None) -> None:
    """Update the marker of ``directory`` (atomically): ``added`` entries are shardtune's now,
    ``removed`` ones are gone, and ``digests`` (file name -> size and SHA-256, see
    ``digests.py``) replace the recorded ones of those files. Folder entries end with ``/``."""
    directory = Path(directory)
    names = (owned(directory) | set(added)) - set(removed)
    known = {k: v for k, v in {**recorded_digests(directory), **(digests or {})}.items() if k in names}
    atomic_write(directory / MARKER, json.dumps({"written_by": "shardtune", "entries": sorted(names),
                                                 "digests": known}, indent=1, sort_keys=True) + "\n")


def _same_place(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def is_inside(inner: Path, outer: Path) -> bool:
    """``inner`` is ``outer`` or below it (after resolving links)."""
    try:
        inner, outer = inner.resolve(), outer.resolve()
    except OSError:
        return False
    return inner == outer or outer in inner.parents


def top_entry_under(directory: str | Path, path: str | Path) -> Optional[str]:
    """The top-level folder of ``directory`` that holds ``path`` (``"checkpoints/"``), or None: the
    entry a run records as its own before it writes there."""
    try:
        rel = Path(path).resolve().relative_to(Path(directory).resolve())
    except ValueError:
        return None
    return rel.parts[0] + "/" if rel.parts else None


def check_output_dir(path: str | Path, *, flag: str, overwrite: bool, overwrite_flag: Optional[str],
                     protected: Mapping[str, Optional[str]] = {},
                     replaced_whole: Iterable[str] = ()) -> list[str]:
    """Refuse an output directory shardtune may not write into; returns the foreign entries
    that ``overwrite`` lets it write beside (empty when there are none).

    ``protected`` maps flags to the paths the command reads from: they are never the output,
    inside it or around it, whatever ``overwrite`` says (``check_not_an_input``). Without an
    overwrite option (``overwrite_flag`` None) foreign files are always refused. ``replaced_whole`` names the folders the command
    writes as a whole (``merged/``, ``checkpoints/``): a foreign one is refused even with
    ``overwrite``, since writing it would replace the user's folder.
    """
    out = Path(path)
    check_not_an_input(out, flag, protected)
    if out.exists() and not out.is_dir():
        raise ShardtuneError(f"{flag} {str(path)!r} is a file, but a directory is needed (it is created "
                             f"if missing). Choose another {flag}.")
    foreign = foreign_entries(out)
    clash = sorted(set(foreign) & set(replaced_whole))
    if clash:
        raise ShardtuneError(
            f"{flag} {str(path)!r} holds a folder {clash[0]} that shardtune did not write, and this run "
            f"writes a folder of that name (whole). Move it, or choose another {flag}.")
    if foreign and not overwrite:
        shown = ", ".join(foreign[:8]) + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else "")
        way_out = f"Choose another {flag}" + (
            "." if overwrite_flag is None else
            f", or pass {overwrite_flag} to write beside them (shardtune then replaces the files whose "
            "names it writes, such as config.json or the weights, and leaves the others in place).")
        raise ShardtuneError(
            f"{flag} {str(path)!r} holds files shardtune did not write ({shown}). shardtune writes only "
            "into a new or empty directory, or one holding only an earlier shardtune run's files, so "
            f"that nothing of yours is replaced or mixed into its output. {way_out}")
    return foreign


def check_not_an_input(out: Path, flag: str, protected: Mapping[str, Optional[str]]) -> None:
    """Refuse an output that is, holds, or lies inside a path the command reads from (``protected``:
    flag -> path): writing there could replace the inputs, and a later clean-up of the output (or
    of the input: a checkpoint pruned by ``--keep_last_n``) would delete the other."""
    for other_flag, other in protected.items():
        if not (other and Path(other).exists()):
            continue  # a hub id, or nothing given
        if is_inside(Path(other), out):
            where = "is" if _same_place(out, Path(other)) else "holds"
        elif is_inside(out, Path(other)):
            where = "is inside"
        else:
            continue
        raise ShardtuneError(
            f"{flag} {str(out)!r} {where} the path {other_flag} reads from ({other}); shardtune never "
            "writes into or around the folders it reads from, since writing there could replace or "
            f"mix with the files this command reads. Choose another {flag}, outside {other}.")


def check_writable(path: str | Path, flag: str) -> None:
    """Refuse, before any work, a folder this process cannot create or write files in: a run would
    otherwise train to its end and lose the work at the first save. The nearest existing folder on
    the way is asked (``access`` reports a read-only mount even to root); nothing is written."""
    path = Path(path).absolute()
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        return  # a file on the way is refused with its own message (check_output_dir)
    if os.access(existing, os.W_OK | os.X_OK):
        return
    try:
        read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    why = "is on a read-only file system" if read_only else "is not writable by this user"
    what = f"{flag} {str(path)!r} " + ("" if existing == path else f"cannot be created: {existing} ")
    raise ShardtuneError(
        f"{what}{why}. The run would train and then lose its work at the first save, so nothing was "
        f"started. Choose a writable {flag}.")


def remove_stale_temps(directory: str | Path) -> list[str]:
    """Remove what interrupted shardtune writes left at the top of ``directory`` (files and
    folders named ``.saving-*``, see ``atomic.py``). Only for a run that holds the folder's lock
    (``output_lock.py``): no other run can be writing them then."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for entry in sorted(directory.iterdir()):
        if fnmatch.fnmatch(entry.name, TEMP_PATTERN):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry.name)
    return removed


def commit_files(tmp: Path, final: Path, stale_patterns: Iterable[str]) -> None:
    """Move every entry of ``tmp`` into ``final`` and record them as shardtune's; then remove the
    entries an earlier shardtune write left in ``final`` that match ``stale_patterns`` and were
    not rewritten (e.g. ``model-00003-of-00003`` after a save with fewer shards).

    New files go in first, so an interruption never leaves ``final`` with fewer weights than
    before; only entries the marker lists are ever removed, so nothing else in ``final`` is
    touched.
    """
    final.mkdir(parents=True, exist_ok=True)
    before = owned(final)
    new = {p.name + ("/" if p.is_dir() else "") for p in tmp.iterdir()}
    digests = digest_files(tmp, files_of(tmp, skip=[MARKER]))  # of the bytes about to be published
    for item in tmp.iterdir():
        if item.is_file():
            fsync_path(item)
        target = final / item.name
        if item.is_dir() and target.is_dir():
            shutil.rmtree(target)  # a folder entry of ours (new names it as ours)
        os.replace(item, target)
    record(final, added=new, digests=digests)
    patterns = tuple(stale_patterns)
    stale = sorted(n for n in before - new if any(fnmatch.fnmatch(n.rstrip("/"), p) for p in patterns))
    for name in stale:
        path = final / name.rstrip("/")
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    record(final, removed=stale)
    shutil.rmtree(tmp, ignore_errors=True)
    fsync_path(final)  # the directory entries of the renames

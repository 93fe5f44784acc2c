"""--dpo_config.precompute_reference on disk: the reference log-probabilities a run computed before
its first step, kept in its output folder so that ``--resume`` reads them instead of running the
reference over every pair again.

``<output_dir>/dpo_reference_logps.json`` holds, per split (``train``, ``eval``), the rows'
fingerprint (data/fingerprint.py: the same digest a checkpoint records of the rows it indexes) and
the ``[chosen, rejected]`` values of each pair, plus what the reference was (``--model_name`` and
``--quantization``: a PEFT run's reference is that base with its adapters off, a full run's the
starting model). It is written atomically and recorded, with its SHA-256, in the folder's marker
like every output. A resumed run reuses it only if the record, the digest, the fingerprints and
the reference all match; otherwise it says why and computes the values again (and rewrites the file).
JSON keeps a float64 exactly (Python writes the shortest repr that reads back the same double).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Optional

import torch

from ..outputs import ownership
from ..outputs.atomic import atomic_write
from ..outputs.digests import digest_file, problems_of

FILE = "dpo_reference_logps.json"
FORMAT = 1


def reference_identity(model_name: str, quantization: Optional[str]) -> dict:
    """What the stored values were computed from (a PEFT reference is this base, adapters off)."""
    return {"model_name": str(model_name), "quantization": quantization}


def save_reference_logps(output_dir: str | Path, identity: dict, fingerprints: Mapping[str, str],
                         values: Mapping[str, torch.Tensor]) -> Path:
    """Write the file (main process only) and record it, with its digest, as this run's output."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = {"format": FORMAT, "reference": identity,
            "splits": {name: {"fingerprint": fingerprints[name], "logps": values[name].double().tolist()}
                       for name in values}}
    ownership.record(out, added=[FILE])  # before the file exists: a crash leaves no foreign file
    atomic_write(out / FILE, json.dumps(data) + "\n")
    ownership.record(out, digests={FILE: digest_file(out / FILE)})
    return out / FILE


def load_reference_logps(output_dir: str | Path, identity: dict,
                         fingerprints: Mapping[str, str]) -> tuple[Optional[dict[str, torch.Tensor]], str]:
    """(the stored values per split, "") when they are this run's, else (None, why not)."""
    out = Path(output_dir)
    path = out / FILE
    if not path.is_file():
        return None, f"{path} does not exist"
    recorded = ownership.recorded_digests(out)
    if FILE not in recorded:
        return None, f"{path} is not recorded as written by shardtune in {out}"
    damaged = problems_of(out, recorded, [FILE])
    if damaged:
        return None, f"{path} is not what shardtune wrote ({damaged[0]})"
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            return None, f"{path} has format {data.get('format')!r}, this version reads {FORMAT}"
        if data["reference"] != identity:
            return None, f"{path} was computed with another reference ({data['reference']}, this run: {identity})"
        splits = data["splits"]
        if set(splits) != set(fingerprints):
            return None, f"{path} holds the splits {sorted(splits)}, this run has {sorted(fingerprints)}"
        values = {}
        for name, fingerprint in fingerprints.items():
            if splits[name]["fingerprint"] != fingerprint:
                return None, f"{path}: the {name} rows differ from those it was computed for (data fingerprint)"
            values[name] = torch.tensor(splits[name]["logps"], dtype=torch.float64).reshape(-1, 2)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        return None, f"{path} could not be read ({type(exc).__name__}: {exc})"
    return values, ""

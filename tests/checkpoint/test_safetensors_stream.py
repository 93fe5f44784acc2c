"""The streaming safetensors writer: files that safetensors and transformers read, holding exactly
the tensors given, and a peak memory that does not grow with the output shard size."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from shardtune.checkpoint.hf_stream import write_safetensors
from shardtune.checkpoint.safetensors_stream import StreamingSafetensorsFile, TensorSpec, plan_shards


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(7, 5, generator=g),
        "b.weight": torch.randn(3, 4, generator=g).to(torch.bfloat16),
        "c.half": torch.randn(9, generator=g).to(torch.float16),
        "d.index": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "e.mask": torch.tensor([True, False, True]),
        "f.scalar": torch.tensor(3.5),
        "g.empty": torch.empty(0, 4),
        "h.bytes": torch.randint(0, 255, (5,), dtype=torch.uint8, generator=g),
    }


def test_written_file_holds_exactly_the_tensors_and_matches_save_file(tmp_path):
    tensors = _tensors()
    specs = [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    f = StreamingSafetensorsFile(tmp_path / "s.safetensors", specs, {"format": "pt"})
    for name in reversed(list(tensors)):  # any order within a file
        f.write(name, tensors[name])
    f.close()
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    got, ref = load_file(str(tmp_path / "s.safetensors")), load_file(str(tmp_path / "ref.safetensors"))
    assert got.keys() == ref.keys() == tensors.keys()
    for name, t in tensors.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t) and torch.equal(ref[name], t)
    with safe_open(str(tmp_path / "s.safetensors"), framework="pt") as h:
        assert h.metadata() == {"format": "pt"}
    # every tensor starts at a multiple of its item size (what save_file's ordering guarantees too)
    raw = (tmp_path / "s.safetensors").read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    assert (8 + size) % 8 == 0
    for name, t in tensors.items():
        assert header[name]["data_offsets"][0] % t.element_size() == 0, name


def test_mistakes_are_refused(tmp_path):
    spec = TensorSpec("w", (2, 2), torch.float32)
    f = StreamingSafetensorsFile(tmp_path / "x.safetensors", [spec])
    with pytest.raises(ValueError, match="the header says"):
        f.write("w", torch.zeros(2, 3))
    with pytest.raises(ValueError, match="not expected"):
        f.write("v", torch.zeros(2, 2))
    with pytest.raises(ValueError, match="never written"):
        f.close()
    with pytest.raises(ValueError, match="duplicate"):
        StreamingSafetensorsFile(tmp_path / "y.safetensors", [spec, spec])


def test_sharded_output_loads_in_transformers(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tensors = list(model.state_dict().items())
    specs = [TensorSpec(n, tuple(t.shape), torch.bfloat16) for n, t in tensors]
    weight_map = write_safetensors(tensors, specs, tmp_path, is_main=True, max_shard_size=60_000)
    files = sorted(set(weight_map.values()))
    assert len(files) > 2 and (tmp_path / "model.safetensors.index.json").is_file()
    assert len(plan_shards(specs, 60_000)) == len(files)
    model.config.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    for name, t in loaded.state_dict().items():
        assert torch.equal(t, dict(tensors)[name].to(torch.bfloat16)), name


_PEAK = textwrap.dedent("""
    import resource, sys, torch
    from pathlib import Path
    from shardtune.checkpoint.hf_stream import write_safetensors
    from shardtune.checkpoint.safetensors_stream import TensorSpec
    n, mb = 24, 16
    specs = [TensorSpec(f"t{i}", (mb * 2**18,), torch.float32) for i in range(n)]
    def tensors():  # made one at a time, as a converter reads them
        for i in range(n):
            yield f"t{i}", torch.full((mb * 2**18,), float(i))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    write_safetensors(tensors(), specs, Path(sys.argv[1]), is_main=True, max_shard_size=sys.argv[2])
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
""")


def test_peak_memory_does_not_grow_with_the_shard_size(tmp_path):
    """384 MB written as one file and as 24 files: the peak grows by about one 16 MB tensor either
    way (save_file would hold a whole shard, 384 MB in the first case)."""
    peaks = {}
    for limit in ("1GB", "17MB"):
        out = tmp_path / limit
        out.mkdir()
        proc = subprocess.run([sys.executable, "-c", _PEAK, str(out), limit], capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        peaks[limit] = int(proc.stdout.split()[-1])
    assert len(list((tmp_path / "17MB").glob("*.safetensors"))) == 24
    assert all(p < 64 for p in peaks.values()), peaks  # MB above the interpreter's own peak

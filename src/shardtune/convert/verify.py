"""``--verify``: the written folder holds exactly the source's weights and gives the same logits.

1. Every written tensor is read back and compared with the source tensor as read (converted to
   the output dtype; merged weights recomputed): they must be identical.
2. The written folder is loaded with ``from_pretrained`` (in fp32; no missing, unexpected or
   mis-shaped keys allowed) and run on a fixed 16-token probe (with an image for a vision model,
   so the vision tower and cross-attention layers are checked too: ``model/probes.py``). The reference is a model built
   from the config and loaded with the source weights as read, rounded to the output dtype
   (LoRA: the base with the adapter applied by peft, unmerged). The max abs logits difference
   must be within 1e-4 x max(1, max |logit|); for a merge into fp16/bf16 weights, where the merged
   weight is rounded once more, 1e-2 (fp16) or 5e-2 (bf16) x that scale.

It needs memory for two copies of the model in fp32; the conversion itself does not.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ..config.errors import ShardtuneError
from ..model.loading import from_pretrained_checked
from ..model.probes import PROBE_TOKENS, probe_inputs, probe_logits
from .conversion import Conversion, read_refs, stream
from .in_memory import apply_adapter
from .sources import hf_weight_files

MERGE_TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _round(conv: Conversion, t: torch.Tensor) -> torch.Tensor:
    if not t.dtype.is_floating_point:
        return t
    return t.to(conv.dtype_of(t.dtype)).float()


def reference_model(conv: Conversion) -> torch.nn.Module:
    """The model built from the config, loaded with the source weights as read (fp32)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = conv.spec.cls(conv.spec.config)
    loaded = read_refs(conv, [item.ref for item in conv.plan.items])
    state = {item.name: _round(conv, loaded.pop(item.ref)) for item in conv.plan.items}
    model.load_state_dict(state, strict=False, assign=True)
    del state
    model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise ShardtuneError(f"--verify: the reference model has weights the checkpoint did not fill: {left[:5]}")
    if any(item.deltas for item in conv.plan.items):
        model = apply_adapter(conv, model, lambda t: _round(conv, t))
    return model.float().eval()


def _compare_model_tensors(conv: Conversion, out: Path) -> int:
    from safetensors import safe_open

    files = hf_weight_files(out)
    handles = {f: safe_open(str(f), framework="pt") for f in files}
    where = {k: f for f, h in handles.items() for k in h.keys()}
    count = 0
    for name, expected in stream(conv):
        if name not in where:
            raise ShardtuneError(f"--verify: {name} is missing from the written files.")
        got = handles[where[name]].get_tensor(name)
        if got.dtype != expected.dtype or not torch.equal(got, expected):
            raise ShardtuneError(f"--verify: the written tensor {name} differs from the source tensor.")
        count += 1
    extra = set(where) - {conv.save_names.get(item.name, item.name) for item in conv.plan.items}
    if extra:
        raise ShardtuneError(f"--verify: unexpected tensors were written: {sorted(extra)[:5]}")
    return count


def _compare_adapter_tensors(conv: Conversion, out: Path) -> int:
    from safetensors.torch import load_file

    written = load_file(str(out / "adapter_model.safetensors"))
    loaded = read_refs(conv, list(conv.plan.adapter.values()))
    for name, ref in conv.plan.adapter.items():
        want = loaded[ref].to(conv.dtype_of(loaded[ref].dtype))
        if name not in written or not torch.equal(written[name], want):
            raise ShardtuneError(f"--verify: the written adapter tensor {name} differs from the source.")
    return len(written)


def verify_output(conv: Conversion, out: Path) -> dict:
    """Check ``out`` (not yet published); raises ShardtuneError on any difference."""
    log = conv.log
    cls = conv.spec.cls
    adapter = conv.plan.adapter_only and not conv.plan.items
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if adapter:
            from peft import PeftModel

            checked = _compare_adapter_tensors(conv, out)
            ref = apply_adapter(conv, from_pretrained_checked(cls, conv.spec.folder, "--model", dtype=torch.float32),
                                lambda t: _round(conv, t)).eval()
            ids = probe_inputs(ref)
            ref_logits = probe_logits(ref, ids)
            del ref
            base = from_pretrained_checked(cls, conv.spec.folder, "--model", dtype=torch.float32)
            dst = PeftModel.from_pretrained(base, str(out)).eval()
        else:
            checked = _compare_model_tensors(conv, out)
            ref = reference_model(conv)
            ids = probe_inputs(ref)
            ref_logits = probe_logits(ref, ids)
            del ref
            dst, info = cls.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
            problems = {k: sorted(info.get(k) or [])[:5] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")
                        if info.get(k)}
            if problems:
                raise ShardtuneError(f"--verify: from_pretrained reported {problems} for the written model.")
            dst = dst.eval()
        dst_logits = probe_logits(dst, ids)
    diff = float((dst_logits - ref_logits).abs().max())
    scale = max(1.0, float(ref_logits.abs().max()))
    merged = any(item.deltas for item in conv.plan.items)
    tolerance = (MERGE_TOLERANCE.get(conv.config_dtype, 1e-4) if merged else 1e-4) * scale
    line = (f"verify: {checked} tensors identical to the source; logits max abs diff {diff:.3e} "
            f"(tolerance {tolerance:.1e}, {PROBE_TOKENS}-token probe{' with an image' if 'pixel_values' in ids else ''})")
    if not diff <= tolerance:  # also catches NaN
        raise ShardtuneError(
            f"--verify failed: the converted model's logits differ from the source model's by {diff:.3e} "
            f"(tolerance {tolerance:.1e}). The output was not kept; check --model and the checkpoint.")
    log(line)
    return {"tensors": checked, "max_abs_diff": diff, "tolerance": tolerance}

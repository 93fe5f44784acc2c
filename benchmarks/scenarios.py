"""The declared scenarios: named runs of the benchmarks, for ``python -m benchmarks run NAME``.

A scenario is a benchmark module and its flags. The unsuffixed name of a benchmark is the run
docs/benchmarks.md reports (on the machine and with the waiting for a quiet machine that section
states); ``<name>.smoke`` is the smallest run that goes through every step of the benchmark on a
CPU in about a minute (tiny shapes: its figures mean nothing), which the tests run; ``.gpu`` are
the runs of scripts/device_check.sh on a lent GPU machine. Standard library only: ``list`` imports
no benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Scenario:
    name: str
    module: str  # a module of this package, run as ``python -m benchmarks.<module>``
    args: tuple[str, ...]
    what: str

    def command(self) -> str:
        return " ".join(["python", "-m", f"benchmarks.{self.module}", *self.args])


def _s(name: str, module: str, args: str, what: str) -> Scenario:
    return Scenario(name, module, tuple(args.split()), what)


SCENARIOS: tuple[Scenario, ...] = (
    _s("throughput", "throughput", "--wait_quiet 60",
       "recipe tok/s and MFU, 35M Llama, 1 and 2 ranks, padding and packing (CPU)"),
    _s("throughput.compile", "throughput", "--wait_quiet 60 --compile both --ranks 1",
       "the same, 1 rank, eager and --compile"),
    _s("throughput.accumulation", "throughput",
       "--wait_quiet 60 --ranks 2 --strategies packing --gradient_accumulation_steps 4 "
       "--gradient_sync every_micro_batch --warmup 1 --timed_steps 3",
       "gradient accumulation (append --gradient_sync last_micro_batch for the other schedule)"),
    _s("throughput.gpu", "throughput",
       "--device cuda --dtype bf16 --size 1b --ranks 1 --strategies padding,packing --compile both "
       "--warmup 2 --timed_steps 4", "one GPU, ~1B Llama in bf16, eager and --compile"),
    _s("throughput.smoke", "throughput",
       "--size tiny --ranks 1 --strategies packing --warmup 1 --timed_steps 1 --context_length 128 "
       "--gemm_reps 2", "smoke: tiny Llama, 1 rank, one timed step"),
    _s("peers", "peers", "--wait_quiet 60",
       "shardtune beside HF Trainer, TRL and torchtune, 31.6M Llama, padded and packed (CPU)"),
    _s("peers.setup", "peers", "--setup", "create the peer frameworks' virtual environment only"),
    _s("peers.gpu", "peers", "--device cuda --size 1b --steps 12 --warmup 4",
       "the peers on one GPU, 1.2B Llama-3.2-1B-shaped model in bf16"),
    _s("peers.tiny", "peers", "--size tiny --process_per framework",
       "every framework on the tiny model (needs the peer venv: peers.setup)"),
    _s("peers.smoke", "peers", "--size tiny --frameworks shardtune,shardtune_plain --process_per framework",
       "smoke: shardtune's two rows only (no peer venv needed)"),
    _s("packed_attention", "packed_attention", "",
       "masked SDPA vs per-document SDPA by row length"),
    _s("packed_attention.smoke", "packed_attention", "--row_lengths 64,128 --tokens 128 --repeats 1",
       "smoke: two short row lengths, one timed step"),
    _s("dpo", "dpo", "--repeats 1 --pairs 2 --seq 256 --steps 2",
       "preference tuning (--use_dpo) against fine-tuning: step time and memory, one process"),
    _s("dpo.smoke", "dpo", "--repeats 1 --pairs 1 --seq 64 --steps 1 --threads 1",
       "smoke: one pair of 64 tokens, one timed step per variant"),
    _s("packing_waste", "packing_waste", "", "pad slots of packing with the real Llama 3 tokenizer"),
    _s("packing_waste.long", "packing_waste", "--output_median_words 40", "the same with longer rows"),
    _s("packing_waste.smoke", "packing_waste", "--rows 200 --seeds 0 --lengths 256",
       "smoke: 200 rows, one seed, one length"),
    _s("model_options", "model_options", "",
       "--loss, activation checkpointing, --compile and AdamW implementations, one process"),
    _s("model_options.smoke", "model_options", "--what checkpointing --batch 1 --seq 64 --steps 1 --repeats 1",
       "smoke: the checkpointing variants on one short row"),
    _s("low_cpu_memory", "low_cpu_memory", "", "host RAM of FSDP set-up, normal vs --low_cpu_fsdp"),
    _s("low_cpu_memory.bf16", "low_cpu_memory", "--checkpoint_dtype bf16", "the same from bf16 weights"),
    _s("low_cpu_memory.smoke", "low_cpu_memory",
       "--hidden 64 --layers 2 --heads 4 --kv_heads 4 --intermediate 128", "smoke: a 2-layer model"),
    _s("real_shape", "real_shape", "", "seed PEFT command, generate and convert --merge at Llama-3.2-1B width"),
    _s("real_shape.malloc_tuning", "real_shape", "--malloc_tuning on", "the same with SHARDTUNE_MALLOC_TUNING=1"),
    _s("real_shape.smoke", "real_shape", "--layers 1 --steps 1 --batch_size 1 --rows 16",
       "smoke: one layer of the 1B width, one step"),
    _s("checkpoint_io", "checkpoint_io", "", "sharded save/load, HF export and a naive gather, ~1 GB model"),
    _s("checkpoint_io.smoke", "checkpoint_io",
       "--hidden 64 --layers 2 --heads 4 --kv_heads 4 --intermediate 128 --seq_len 8", "smoke: a 2-layer model"),
    _s("convert", "convert", "", "sharded DCP checkpoint -> HF folder, against dcp_to_torch_save"),
    _s("convert.optimizer", "convert", "--optimizer", "the same with AdamW state in the checkpoint"),
    _s("convert.smoke", "convert", "--layers 2 --hidden 64 --intermediate 128 --vocab 512",
       "smoke: a 2-layer model"),
    _s("vision_data_memory", "vision_data_memory", "--workdir /tmp/vision-mem --rows 20000",
       "host RAM of vision data per rank and DataLoader worker"),
    _s("vision_data_memory.smoke", "vision_data_memory", "--rows 40 --batches 1", "smoke: 40 rows"),
    _s("demo_tuning", "demo_tuning", "", "the search behind shardtune demo's model size and hyperparameters"),
    _s("demo_tuning.smoke", "demo_tuning", "--epochs 1 --n_train 64 --n_eval 8 --batch_size 16",
       "smoke: one short epoch"),
)

BY_NAME = {s.name: s for s in SCENARIOS}

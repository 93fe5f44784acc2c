"""Shared fixtures: tiny models and tokenizers built locally, once per test session."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch

# Keep each test process to the machine's two cores (shared by pytest-xdist's workers) and quiet.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", 1)))))

# The modules whose tests use the session's shared 2-rank launch (``run_fsdp_cases``, directly or
# through ``ranks``). pytest-xdist runs them on one worker, so that launch starts once; every other
# module is a unit of its own (``--dist loadfile``). Checked at collection: a module that uses the
# launch and is missing here is an error, not a second launch.
FSDP_POOL_MODULES = frozenset({
    "tests/checkpoint/test_digests.py", "tests/checkpoint/test_resume.py", "tests/checkpoint/test_tied_lora.py",
    "tests/convert/test_errors.py", "tests/convert/test_rank_checkpoints.py", "tests/data/test_image_checks.py",
    "tests/infer/test_sources.py", "tests/parallel/test_fsdp.py", "tests/parallel/test_fsdp_dpo.py",
    "tests/parallel/test_fsdp_speed.py", "tests/parallel/test_fsdp_vision.py", "tests/plan/test_exact_shards.py",
})


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") not in ("load", "loadfile"):  # a --dist the user chose stands
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModulesAndTheSharedLaunch(LoadScopeScheduling):
        """``--dist loadfile``, with the modules of FSDP_POOL_MODULES as one unit (largest first)."""

        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::")[0]
            return "fsdp-pool" if module in FSDP_POOL_MODULES else module

    return ModulesAndTheSharedLaunch(config, log)


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.gpu`` tests run only where a CUDA GPU is visible (scripts/device_check.sh);
    ``@pytest.mark.peer`` tests (checks against TRL and other peers) only where ``peer_check_wanted``."""
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run scripts/device_check.sh on a GPU machine)")
    no_peer = pytest.mark.skip(reason="a peer check: SHARDTUNE_PEER_SMOKE=1 runs it")
    gpu, peer = torch.cuda.is_available(), peer_check_wanted()
    unlisted = sorted({item.nodeid.split("::")[0] for item in items if "run_fsdp_cases" in item.fixturenames}
                      - FSDP_POOL_MODULES)
    if unlisted:
        raise pytest.UsageError(f"{', '.join(unlisted)} use the shared 2-rank launch (run_fsdp_cases): add them to "
                                "FSDP_POOL_MODULES in tests/conftest.py, or pytest-xdist starts it on every worker.")
    for item in items:
        if "gpu" in item.keywords and not gpu:
            item.add_marker(no_gpu)
        if "peer" in item.keywords and not peer:
            item.add_marker(no_peer)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random-initialised 2-layer Llama (~160k params) + BPE tokenizer as an HF directory."""
    from shardtune.demo.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), seed=0)


@pytest.fixture(scope="session")
def tiny_tied_model_dir(tmp_path_factory) -> Path:
    """The same tiny Llama with tied input/output embeddings (no lm_head.weight in its files)."""
    from shardtune.demo.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-tied-llama"), seed=0, tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tiny_vision_model_dir(tmp_path_factory) -> Path:
    """A random-initialised tiny Llama 3.2 Vision (Mllama, ~110k params) + its processor."""
    from shardtune.demo.tiny import build_tiny_mllama

    return build_tiny_mllama(tmp_path_factory.mktemp("tiny-vision"), seed=0)


# Meta's published Llama 3.2 1B config.json and generation_config.json, key for key (transformers
# 4.45's format: top-level rope_theta / rope_scaling, torch_dtype).
META_LLAMA32_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
    "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.45.0.dev0", "use_cache": True, "vocab_size": 128256,
}
META_GENERATION_CONFIG = {"bos_token_id": 128000, "do_sample": True, "eos_token_id": 128001, "temperature": 0.6,
                          "top_p": 0.9, "transformers_version": "4.45.0.dev0"}
# What the tiny model's own config decides (its size and token ids); the rest is Meta's.
TINY_KEYS = ("bos_token_id", "eos_token_id", "head_dim", "hidden_size", "intermediate_size",
             "num_attention_heads", "num_hidden_layers", "num_key_value_heads", "vocab_size")


@pytest.fixture(scope="session")
def meta_format_model_dir(tmp_path_factory) -> Path:
    """The tiny tied Llama in bf16 with config.json and generation_config.json in the format Meta
    publishes Llama 3.2 in (llama3 rope scaling, rope_theta 500000): what outputs must keep."""
    import json

    from shardtune.demo.tiny import build_tiny_llama

    path = build_tiny_llama(tmp_path_factory.mktemp("meta-llama"), seed=0, dtype=torch.bfloat16,
                            tie_word_embeddings=True)
    tiny = json.loads((path / "config.json").read_text())
    config = {k: tiny[k] if k in TINY_KEYS else v for k, v in META_LLAMA32_CONFIG.items()}
    generation = {k: tiny[k] if k in TINY_KEYS else v for k, v in META_GENERATION_CONFIG.items()}
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    tok = json.loads((path / "tokenizer_config.json").read_text())
    tok["tokenizer_class"] = "PreTrainedTokenizerFast"  # as Meta's tokenizer_config.json
    (path / "tokenizer_config.json").write_text(json.dumps(tok, indent=2) + "\n")
    return path


PROBE_IDS = [[1, 17, 42, 99, 5, 230, 7, 64, 300, 11, 2, 150]]


@pytest.fixture(scope="session")
def meta_outputs(meta_format_model_dir, tmp_path_factory):
    """Every kind of output written from the Meta-format base, by the code users run: the recipe's
    full fine-tune export (fp32, with a step checkpoint), ``shardtune convert`` of that checkpoint
    (its dtype, and --dtype bf16), and a LoRA run's ``--merge_lora`` folder; plus the logits of the
    trained model and of the saved adapter on PROBE_IDS, in fp32."""
    import json
    import warnings
    from types import SimpleNamespace

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from shardtune.config import parse_args
    from shardtune.convert import convert
    from shardtune.finetuning import main as finetune
    from shardtune.finetuning import setup, train
    from shardtune.parallel.distributed import init_distributed

    root = tmp_path_factory.mktemp("meta-outputs")
    data = root / "data.json"
    data.write_text(json.dumps([{"instruction": f"Add {i} and {i + 1}.", "output": f"The answer is {2 * i + 1}."}
                                for i in range(16)]))
    args = ["--model_name", str(meta_format_model_dir), "--dataset", "alpaca_dataset", "--alpaca_dataset.data_path",
            str(data), "--device", "cpu", "--batching_strategy", "padding", "--batch_size_training", "4",
            "--context_length", "64", "--lr", "1e-2", "--max_train_step", "2", "--run_validation", "False",
            "--seed", "1"]
    ids = torch.tensor(PROBE_IDS)
    cfg = parse_args([*args, "--output_dir", str(root / "full"), "--save_every_n_steps", "2"]).config
    c = setup(cfg, init_distributed("cpu"))
    train(cfg, init_distributed("cpu"), c)
    c.model.eval()
    with torch.no_grad():
        trained = c.model(input_ids=ids).logits.float()
    (step,) = (root / "full").glob("checkpoints/*/step-*")
    quiet = lambda _: None  # noqa: E731
    convert(step, root / "converted", log=quiet)
    convert(step, root / "converted-bf16", dtype="bf16", log=quiet)
    finetune([*args, "--output_dir", str(root / "lora"), "--use_peft", "--lora_config.lora_dropout", "0",
              "--merge_lora"])
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        base = AutoModelForCausalLM.from_pretrained(meta_format_model_dir, dtype=torch.float32)
        adapted = PeftModel.from_pretrained(base, str(root / "lora")).eval()(input_ids=ids).logits.float()
    return SimpleNamespace(base=meta_format_model_dir, full=root / "full", converted=root / "converted",
                           converted_bf16=root / "converted-bf16", merged=root / "lora" / "merged",
                           trained_logits=trained, adapted_logits=adapted, ids=ids)


def pip_target(final: Path, requirements: dict[str, str], why: str) -> Path:
    """A folder holding only ``requirements`` ({name: version}, installed with pip --no-deps --target,
    once per machine, into ``final``): first on a subprocess's PYTHONPATH (or sys.path) it adds or
    shadows those packages while the rest come from this environment. Without pip or a package
    registry the test skips, saying ``why`` it needed them. Built in a sibling folder and renamed,
    so an interrupted install is never taken for a finished one."""
    import shutil
    import subprocess
    import sys

    def ready() -> bool:  # the marker, or (a copy built before the marker) every package's dist-info
        return (final / ".complete").is_file() or all(
            (final / f"{name.replace('-', '_')}-{version}.dist-info").is_dir() for name, version in requirements.items())

    if ready():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    building = final.parent / f".{final.name}.building-{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
           "--target", str(building), *(f"{name}=={version}" for name, version in requirements.items())]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        proc = None
    if proc is None or proc.returncode != 0:
        shutil.rmtree(building, ignore_errors=True)
        detail = "timed out" if proc is None else (proc.stderr or proc.stdout).strip()[-600:]
        pytest.skip(f"{why} needs pip and a package registry to build {final} ({' '.join(cmd[3:])}): {detail}")
    (building / ".complete").write_text(" ".join(cmd) + "\n")
    try:
        os.replace(building, final)
    except OSError:  # another session finished first: use its copy
        shutil.rmtree(building, ignore_errors=True)
    return final


# transformers 4.x for the outputs' consumer-side checks: the last 4.57 patch, and the
# huggingface_hub and tokenizers releases its requirements allow (hub < 1.0, tokenizers <= 0.23.0).
TRANSFORMERS4 = {"transformers": "4.57.6", "huggingface_hub": "0.36.2", "tokenizers": "0.22.2"}


@pytest.fixture(scope="session")
def transformers4_path() -> Path:
    """transformers 4.57 (and its hub client and tokenizers) only, in ~/.cache/shardtune-tf4/<versions>:
    first on a subprocess's PYTHONPATH, it shadows this environment's transformers 5."""
    key = "-".join(f"{name}{version}" for name, version in TRANSFORMERS4.items())
    return pip_target(Path.home() / ".cache" / "shardtune-tf4" / key, TRANSFORMERS4, "the transformers 4.x checks")


TRL_VERSION = "1.16.0"  # benchmarks/peers.py's


def peer_check_wanted() -> bool:
    """As tests/benchmarks/test_peers_smoke.py: SHARDTUNE_PEER_SMOKE=1 asks for the peer checks, 0
    skips them; unset, they run where the benchmark peers' venv is set up (not in a fresh clone)."""
    flag = os.environ.get("SHARDTUNE_PEER_SMOKE")
    if flag is not None:
        return flag not in ("", "0", "false", "False")
    return (Path(__file__).resolve().parents[2] / ".bench-venv" / "peers" / ".peers-installed.json").is_file()


@pytest.fixture(scope="session")
def trl_path() -> Path:
    """TRL alone (no dependencies: this environment has them) in ~/.cache/shardtune-trl/trl-<version>."""
    return pip_target(Path.home() / ".cache" / "shardtune-trl" / f"trl-{TRL_VERSION}", {"trl": TRL_VERSION},
                      "the TRL peer check")


@pytest.fixture(scope="session")
def keeps_base_config():
    """check(out, base, dtype): out's config.json is base's, key for key and in its order, with
    only torch_dtype set to ``dtype``; its generation_config.json is base's, byte for byte."""
    import json

    def check(out: Path, base: Path, dtype: str) -> dict:
        got = json.loads((out / "config.json").read_text())
        want = json.loads((base / "config.json").read_text())
        expected = {**want, "torch_dtype": dtype}
        assert got == expected, {k: (got.get(k), expected.get(k)) for k in {*got, *expected}
                                 if got.get(k) != expected.get(k)}
        assert list(got) == list(want)
        assert (out / "generation_config.json").read_bytes() == (base / "generation_config.json").read_bytes()
        return got

    return check


COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}


def write_colour_rows(folder: Path, n: int, seed: int = 0) -> Path:
    """``n`` the_cauldron-style rows (one PNG each, a block of colour on grey; the answer is the
    colour) as ``folder/data.jsonl`` with image paths relative to it."""
    import json
    import random

    from PIL import Image

    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        name = rng.choice(sorted(COLOURS))
        image = Image.new("RGB", (rng.randint(24, 40), rng.randint(24, 40)), (128, 128, 128))
        image.paste(COLOURS[name], (4, 4, image.width - 4, image.height - 4))
        image.save(folder / "images" / f"{i}.png")
        rows.append({"images": [f"images/{i}.png"],
                     "texts": [{"user": "What colour is the block?", "assistant": name}]})
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def colour_rows(tmp_path_factory) -> Path:
    """40 image + question + answer rows for ``--dataset ocrvqa_dataset`` (a JSONL file)."""
    return write_colour_rows(tmp_path_factory.mktemp("colour-rows"), 40)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


FSDP_WORKER = Path(__file__).parent / "parallel" / "fsdp_worker.py"


class FsdpPool:
    """One 2-rank torchrun launch of fsdp_worker.py --serve, shared by every module's
    ``run_fsdp_cases`` call: a launch costs ~10 s here (torchrun, 2 ranks and their DataLoader fork
    servers each import torch), the cases themselves a second or two each. It starts at the first
    request and again after a request that ended it (a failing case ends the launch, as before)."""

    def __init__(self, root: Path):
        self.root, self.proc, self.queue, self.k, self.launches = root, None, None, 0, 0

    def _start(self) -> None:
        import subprocess
        import sys

        import psutil

        self.launches += 1
        self.queue = self.root / f"launch-{self.launches}"
        self.queue.mkdir()
        self.k = 0
        # the ranks stop by themselves if this process is killed (no pool left polling for ever)
        (self.queue / "owner").write_text(f"{os.getpid()}:{psutil.Process().create_time()}")
        # --monitor-interval: torchrun checks its ranks every second, not 10 times a second, for the
        # whole session (a failed rank is still seen within a second)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               "--monitor-interval", "1", str(FSDP_WORKER), "--serve", str(self.queue)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with open(self.queue / "stdout", "wb") as out, open(self.queue / "stderr", "wb") as err:
            # its own session: a timed-out launch is killed with its ranks and their fork servers
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, start_new_session=True)

    def _tails(self) -> str:
        return ((self.queue / "stdout").read_text(errors="replace")[-3000:] + "\n"
                + (self.queue / "stderr").read_text(errors="replace")[-8000:])

    def _kill(self) -> None:
        import signal

        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.proc = None

    def run(self, root: Path, cases: dict, timeout_s: int) -> dict:
        import json
        import time

        if self.proc is None or self.proc.poll() is not None:
            self._start()
        (root / "cases.json").write_text(json.dumps(cases))
        out = root / "results.json"
        request = self.queue / f"{self.k}.json"
        (self.queue / "request.tmp").write_text(json.dumps({"cases": str(root / "cases.json"), "out": str(out)}))
        os.replace(self.queue / "request.tmp", request)  # the ranks never read half a request
        done = self.queue / f"{self.k}.done"
        self.k += 1
        deadline, wait = time.monotonic() + timeout_s, 0.05
        while not done.is_file():  # polling for another process's event, not a fixed wait
            if self.proc.poll() is not None:  # a case failed and ended the launch
                code, self.proc = self.proc.returncode, None
                pytest.fail(f"2-rank run exited with {code}\n{self._tails()}")
            if time.monotonic() > deadline:  # the worker's own watchdog should fire first
                self._kill()
                pytest.fail(f"2-rank run timed out after {timeout_s} s\n{self._tails()}")
            time.sleep(wait)
            wait = min(wait * 1.5, 0.5)
        return json.loads(out.read_text())

    def close(self) -> None:
        if self.proc is None:
            return
        (self.queue / "stop").touch()
        try:
            code = self.proc.wait(timeout=120)
        except Exception:
            self._kill()
            raise
        self.proc = None
        assert code == 0, self._tails()


@pytest.fixture(scope="session")
def run_fsdp_cases(tmp_path_factory):
    """``run(root, cases)``: run named recipe cases on 2 real gloo ranks (see fsdp_worker.py) and
    return their results; every call in the session is served by one torchrun launch (FsdpPool)."""
    pool = FsdpPool(tmp_path_factory.mktemp("fsdp-pool"))

    def run(root: Path, cases: dict, timeout_s: int = 600) -> dict:
        return pool.run(root, cases, timeout_s)

    yield run
    pool.close()


@pytest.fixture(scope="session")
def ranks(tiny_model_dir, tmp_path_factory, run_fsdp_cases) -> Path:
    """Every rank-written checkpoint that conversion and inference read, written by 2 gloo ranks in
    the session's shared launch (``run_fsdp_cases``, no launch of its own):

    1. ``ROOT/full``: the shardtune recipe (setup + train, as ``python -m shardtune.finetuning``), FSDP2,
       2 steps, a DCP checkpoint every 2 steps -> ``checkpoints/fine-tuned/step-000002`` plus the HF
       model the recipe saves in ``ROOT/full``.
    2. ``ROOT/lora``: the same with ``--use_peft`` (LoRA) and ``--merge_lora`` -> an adapter-only
       checkpoint, the adapter folder and ``ROOT/lora/merged``.
    3. ``ROOT/llama-recipes`` and ``ROOT/llama-recipes-full/tiny-1.pt``: what llama-recipes' FSDP1
       sharded and full saves write (fsdp_worker.py ``run_llama_recipes_fsdp1``)."""
    import json

    root = tmp_path_factory.mktemp("ranks")
    data = root / "data.json"
    data.write_text(json.dumps([{"instruction": f"Spell {i}.", "output": " ".join(str(i))} for i in range(24)]))

    def recipe(name: str, *extra: str) -> dict:
        return {"logits": False, "args": [
            "--enable_fsdp", "--device", "cpu", "--model_name", str(tiny_model_dir), "--dataset", "alpaca_dataset",
            "--alpaca_dataset.data_path", str(data), "--batching_strategy", "padding", "--batch_size_training", "2",
            "--max_train_step", "2", "--save_every_n_steps", "2", "--output_dir", str(root / name),
            "--run_validation", "False", "--context_length", "64", "--lr", "5e-3", "--seed", "1", *extra]}

    cases = {"full": recipe("full"),
             "lora": recipe("lora", "--use_peft", "--peft_method", "lora", "--merge_lora", "True"),
             "llama-recipes": {"kind": "llama_recipes_fsdp1", "model": str(tiny_model_dir), "root": str(root)}}
    # the pool's cases.json/results.json go beside ROOT, not in it (tests list ROOT's folders)
    run_fsdp_cases(tmp_path_factory.mktemp("ranks-cases"), cases)
    return root


@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs(size="3M", read_only=False) -> Path``: a real small (or read-only) file system
    mounted under ``tmp_path``, unmounted at teardown; the test is skipped where mounting is not
    permitted (not root, no CAP_SYS_ADMIN)."""
    import subprocess

    mounted: list[Path] = []

    def mount(size: str = "3M", read_only: bool = False) -> Path:
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        try:
            proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
                                  capture_output=True, text=True)
        except FileNotFoundError:
            pytest.skip("cannot mount a tmpfs here: no mount command")
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {proc.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], check=False)


class WarmCli:
    """``run(args, env=None, cwd=None, input=None, timeout=300) -> CompletedProcess``: what
    ``subprocess.run([python, "-m", "shardtune", *args], capture_output=True, text=True)`` returns,
    from a child of one pre-imported server (``tests/warm_cli``) instead of a fresh interpreter:
    ~0.5 s of start-up instead of ~4.5 s of CPU. A fresh interpreter runs the command instead when
    the request's start-up environment differs from the server's in any way (a variable read once
    when an interpreter or a library starts: PYTHONPATH, malloc and OpenMP tunables, HF_*, HOME,
    TMPDIR, locale, ...), when the server could not serve, or with SHARDTUNE_TEST_FRESH_CLI=1 (a
    whole suite of fresh interpreters, to check that nothing depends on what the server imported)."""

    STARTUP_PREFIXES = ("PYTHON", "LD_", "MALLOC_", "GLIBC_", "OMP_", "MKL_", "OPENBLAS_", "KMP_", "CUDA",
                        "PYTORCH_", "TORCH", "HF_", "TRANSFORMERS_", "HUGGINGFACE", "NCCL_", "SHARDTUNE_HOST",
                        "HOME", "TMPDIR", "XDG_", "LANG", "LC_", "MPLCONFIGDIR", "TZ")
    RUNTIME = frozenset({"OMP_NUM_THREADS"})  # the child sets it itself
    # set in os.environ by an import (peft's sets inductor's cache folder to its default): an
    # environment a test built before that import lacks it, with the same effect
    SET_BY_IMPORTS = frozenset({"TORCHINDUCTOR_CACHE_DIR"})

    def __init__(self, root: Path):
        import itertools
        import select
        import subprocess
        import sys

        self.root, self.numbers, self.live = root, itertools.count(1), set()  # next(): atomic across threads
        self.socket = root / "warm-cli.sock"
        self.env, self.proc, self.ready = dict(os.environ), None, False
        if os.environ.get("SHARDTUNE_TEST_FRESH_CLI") == "1":
            return
        with open(root / "server.log", "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "warm_cli", str(self.socket)],
                                         cwd=Path(__file__).parent, stdout=subprocess.PIPE, stderr=log, text=True)
        started = select.select([self.proc.stdout], [], [], 300)[0]
        self.ready = bool(started) and self.proc.stdout.readline().strip() == "ready"

    def _startup(self, env: dict) -> dict:
        return {k: v for k, v in env.items() if k.startswith(self.STARTUP_PREFIXES)
                and k not in self.RUNTIME | self.SET_BY_IMPORTS}

    def run(self, args, *, env: dict | None = None, cwd=None, input: str | None = None, timeout: float = 300):
        import json
        import signal
        import socket
        import subprocess
        import sys

        args = [str(a) for a in args]
        env = dict(os.environ if env is None else env)
        cmd = [sys.executable, "-m", "shardtune", *args]

        def fresh() -> subprocess.CompletedProcess:
            return subprocess.run(cmd, env=env, cwd=cwd, input=input, capture_output=True, text=True, timeout=timeout)

        if not self.ready or self._startup(env) != self._startup(self.env):
            return fresh()
        n = next(self.numbers)
        files = {name: self.root / f"{n}.{name}" for name in ("stdin", "stdout", "stderr")}
        files["stdin"].write_text(input or "")
        files["stdout"].touch()
        files["stderr"].touch()
        request = {"argv": args, "env": env, "cwd": str(Path(cwd or os.getcwd()).resolve()),
                   **{name: str(path) for name, path in files.items()}}
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn, conn.makefile("r") as replies:
            try:
                conn.connect(str(self.socket))
                conn.sendall((json.dumps(request) + "\n").encode())
                pid = int(replies.readline())
            except (OSError, ValueError):  # the server is gone: this and later commands run fresh
                self.ready = False
                return fresh()
            self.live.add(pid)
            conn.settimeout(timeout)
            try:
                code = int(replies.readline())
            except BaseException as exc:  # timed out, or the test was interrupted: end what it started
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                if isinstance(exc, TimeoutError):
                    raise subprocess.TimeoutExpired(cmd, timeout) from None
                raise
            finally:
                self.live.discard(pid)
        return subprocess.CompletedProcess(cmd, code, files["stdout"].read_text(errors="replace"),
                                           files["stderr"].read_text(errors="replace"))

    def close(self) -> None:
        import signal

        for pid in list(self.live):  # commands still running (an interrupted session)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="session")
def shardtune_cli(tmp_path_factory):
    """``shardtune_cli(args, env=None, cwd=None, input=None, timeout=300)``: a shardtune command's
    CompletedProcess, from a pre-imported server's child (WarmCli): for the tests about what a
    command does, not about how an interpreter starts (those run ``sys.executable`` themselves)."""
    cli = WarmCli(tmp_path_factory.mktemp("warm-cli"))
    yield cli.run
    cli.close()


def pytest_sessionfinish(session, exitstatus):
    """Where SHARDTUNE_PYTEST_FINISHED names a file, write it when the run reaches its end.

    ``.ci/run`` checks for it: a test that ends the pytest process itself (``os._exit(0)``) leaves
    exit code 0 and no summary, which once made CI pass with a quarter of the suite not run.
    """
    marker = os.environ.get("SHARDTUNE_PYTEST_FINISHED")
    if marker and not hasattr(session.config, "workerinput"):  # pytest-xdist's controller, not a worker
        Path(marker).write_text(f"{session.testscollected} collected, exit status {int(exitstatus)}\n")


# --- The real Llama 3 tokenizer and chat templates (issue 21) ---------------------------------
# Built once per session from Meta's BPE file in the `llama-models` package
# (shardtune.demo.llama3). The chat templates are Meta's public Jinja text, kept in
# tests/data/chat_templates/ (see the README there for where they come from).

CHAT_TEMPLATES = Path(__file__).parent / "data" / "chat_templates"


@pytest.fixture(scope="session")
def llama3_tokenizer_dir(tmp_path_factory) -> Path:
    """A directory with the real Llama 3 tokenizer and Llama 3.2 Instruct's chat template."""
    from shardtune.demo.llama3 import build_llama3_tokenizer

    path = tmp_path_factory.mktemp("llama3-tokenizer")
    template = (CHAT_TEMPLATES / "llama-3.2-instruct.jinja").read_text(encoding="utf-8")
    build_llama3_tokenizer(template).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def llama3_tokenizer(llama3_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llama3_tokenizer_dir)


@pytest.fixture(scope="session")
def llama3_chat_model_dir(llama3_tokenizer_dir, tmp_path_factory) -> Path:
    """A random tiny Llama (hidden 16, 2 layers) with the real vocabulary (128,256 ids) and the real
    tokenizer + Instruct template: the paths that need real ids (chat masks by <|eot_id|> 128009)."""
    import shutil

    from transformers import AutoTokenizer, GenerationConfig, LlamaForCausalLM

    from shardtune.demo.llama3 import INSTRUCT_STOP_IDS, VOCAB
    from shardtune.demo.tiny import tiny_llama_config

    path = tmp_path_factory.mktemp("llama3-chat-model")
    tokenizer = AutoTokenizer.from_pretrained(llama3_tokenizer_dir)
    config = tiny_llama_config(tokenizer, hidden_size=16, intermediate_size=32)
    config.vocab_size, config.pad_token_id = VOCAB, None  # Llama 3.2 Instruct has no pad token
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    GenerationConfig(bos_token_id=128000, eos_token_id=list(INSTRUCT_STOP_IDS)).save_pretrained(path)
    for f in llama3_tokenizer_dir.iterdir():
        shutil.copy(f, path / f.name)
    return path


@pytest.fixture(scope="session")
def real_vocab_vision_model_dir(tmp_path_factory) -> Path:
    """A random tiny Llama 3.2 Vision (Mllama) whose ``MllamaProcessor`` is the real Llama 3
    tokenizer + <|image|> at id 128256 (as Llama-3.2-11B-Vision-Instruct's) + a tiny image
    processor + the Vision Instruct chat template; text vocab_size 128,256 as the real model's."""
    import warnings

    from transformers import GenerationConfig, MllamaForConditionalGeneration, MllamaProcessor
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    from shardtune.demo.llama3 import INSTRUCT_STOP_IDS, VOCAB, build_llama3_tokenizer
    from shardtune.demo.tiny import IMAGE_TOKEN, tiny_mllama_config

    path = tmp_path_factory.mktemp("real-vocab-vision")
    template = (CHAT_TEMPLATES / "llama-3.2-vision-instruct.jinja").read_text(encoding="utf-8")
    tokenizer = build_llama3_tokenizer(template, pad_token="<|finetune_right_pad_id|>")
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    assert tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == VOCAB
    processor = MllamaProcessor(image_processor=MllamaImageProcessorPil(size={"height": 28, "width": 28},
                                                                        max_image_tiles=2),
                                tokenizer=tokenizer, chat_template=template)
    config = tiny_mllama_config(tokenizer, hidden_size=16)
    config.text_config.vocab_size = VOCAB  # <|image|> lives in the embedding's 8 extra rows
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = MllamaForConditionalGeneration(config)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    GenerationConfig(bos_token_id=128000, eos_token_id=list(INSTRUCT_STOP_IDS),
                      pad_token_id=tokenizer.pad_token_id).save_pretrained(path)
    return path


REAL_VOCAB = 128_256  # Llama 3's vocabulary (Llama 3.2 1B/3B tie their head to it)


@pytest.fixture(scope="session")
def real_vocab_tied_model_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama of hidden size 64 with Llama 3's real vocabulary (128,256 rows) and tied
    embeddings, as Llama 3.2 1B/3B: the embedding (32.8 MB in fp32) outweighs everything else, so
    sizes of checkpoints, adapters and exports show whether it was written. The tokenizer is the
    tiny one (ids below 512 index the same embedding)."""
    from transformers import LlamaForCausalLM

    from shardtune.demo.tiny import build_tokenizer, tiny_llama_config

    path = tmp_path_factory.mktemp("real-vocab-tied-llama")
    tokenizer = build_tokenizer()
    config = tiny_llama_config(tokenizer, hidden_size=64, num_layers=2, tie_word_embeddings=True)
    config.vocab_size = REAL_VOCAB
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path

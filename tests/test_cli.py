"""The `shardtune` command as a user runs it (subprocess)."""

import subprocess
import sys


from shardtune.parallel.launch import split_launch_args


def shardtune(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "shardtune", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_help_lists_commands():
    out = shardtune("--help")
    assert out.returncode == 0 and "finetune" in out.stdout and "demo" in out.stdout


def test_unknown_command_suggests():
    out = shardtune("finetun")
    assert out.returncode == 2 and "Did you mean `shardtune finetune`?" in out.stderr


def test_misspelt_flag_is_one_clear_error_not_a_traceback():
    out = shardtune("finetune", "--lrr", "1e-4")
    assert out.returncode == 2
    assert "Did you mean --lr?" in out.stderr and "Traceback" not in out.stderr


def test_bad_model_path_is_a_clear_error(tmp_path):
    data = tmp_path / "a.json"
    data.write_text('[{"instruction": "x", "input": "", "output": "y"}]')
    out = shardtune("finetune", "--model_name", str(tmp_path / "missing"), "--dataset", "alpaca_dataset",
                    "--alpaca_dataset.data_path", str(data))
    assert out.returncode == 2 and "does not exist" in out.stderr and "Traceback" not in out.stderr


def test_help_config_lists_every_section():
    out = shardtune("finetune", "--help-config")
    assert out.returncode == 0
    for name in ("--train_config.lr", "--fsdp_config.sharding_strategy", "--lora_config.r",
                 "--alpaca_dataset.data_path", "--custom_dataset.file"):
        assert name in out.stdout


def test_launch_options_are_split_from_recipe_options():
    launch, rest = split_launch_args(["--nproc_per_node", "2", "--lr", "1", "--nnodes=1", "--enable_fsdp"])
    assert launch == ["--nproc_per_node", "2", "--nnodes=1"] and rest == ["--lr", "1", "--enable_fsdp"]


def test_valueless_launch_flags_are_split_too():
    launch, rest = split_launch_args(["--standalone", "--nproc_per_node=2", "--lr", "1"])
    assert launch == ["--standalone", "--nproc_per_node=2"] and rest == ["--lr", "1"]


# A process that ran a process group ends without interpreter teardown (end_process): gloo's
# threads can otherwise abort or hang it at exit. Its exit code and buffered output still come out.
_RANK_SCRIPT = """
import atexit, sys
from shardtune.exits import run_with_clean_errors
from shardtune.config.errors import ShardtuneError
from shardtune.parallel.distributed import init_distributed, shutdown

atexit.register(lambda: print("teardown ran", flush=True))

def work():
    if sys.argv[1] != "no-group":
        init_distributed("cpu", need_group=True)
        shutdown()
    print("work done")  # block-buffered (stdout is a pipe): must still come out
    if sys.argv[1] == "user-error":
        raise ShardtuneError("the data file is missing")
    if sys.argv[1] == "crash":
        raise RuntimeError("boom")

run_with_clean_errors(work)
"""


def _rank_script(mode: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _RANK_SCRIPT, mode], capture_output=True, text=True,
                          timeout=120)


def test_a_process_that_ran_a_group_exits_without_teardown_keeping_its_output():
    ok = _rank_script("ok")
    assert ok.returncode == 0, ok.stderr
    assert "work done" in ok.stdout and "teardown ran" not in ok.stdout


def test_a_rank_that_fails_still_reports_and_sets_its_exit_code():
    user = _rank_script("user-error")
    assert user.returncode == 2 and "error: the data file is missing" in user.stderr
    assert "Traceback" not in user.stderr and "teardown ran" not in user.stdout
    crash = _rank_script("crash")
    assert crash.returncode == 1 and "RuntimeError: boom" in crash.stderr and "Traceback" in crash.stderr


def test_a_process_without_a_group_exits_normally():
    plain = _rank_script("no-group")
    assert plain.returncode == 0 and "work done" in plain.stdout and "teardown ran" in plain.stdout


# A test suite (or a notebook) that started a process group earlier and then runs a command
# in-process must get control back: before the fix, `shardtune plan` called in-process after any
# in-process FSDP test ended pytest itself through os._exit(0), and CI reported the remaining
# quarter of the suite as passed without running it. Run in a subprocess so that a regression
# fails this test instead of ending the test run.
_IN_PROCESS_SCRIPT = """
from shardtune.cli import main
from shardtune.parallel.distributed import init_distributed, shutdown

init_distributed("cpu", need_group=True)  # an earlier in-process run's group
shutdown()
for argv in (["plan", "--size", "1b"], ["plan", "--size", "13b"]):
    try:
        main(argv)
    except SystemExit as exc:
        print("exit", exc.code)
print("control came back")
"""


def test_a_command_run_in_process_after_an_earlier_group_returns_to_its_caller():
    out = subprocess.run([sys.executable, "-c", _IN_PROCESS_SCRIPT], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "exit 2" in out.stdout and "control came back" in out.stdout, out.stdout[-3000:]

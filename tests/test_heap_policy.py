"""`--low-memory`: freed blocks go back to the system at once; by default the trainer keeps them."""
import subprocess
import sys

import pytest

from rwkv_sft.cli import build_parser
from rwkv_sft.train.cli import build_config

PROBE = """
import sys, torch
from rwkv_sft.utils import set_heap_policy
def resident_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
assert set_heap_policy(low_memory=sys.argv[1] == "low")
t = torch.ones(16 << 20)  # 64 MiB, touched
before = resident_mib()
del t
print(before - resident_mib())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_low_memory_returns_freed_blocks_and_the_default_keeps_them():
    freed = {policy: float(subprocess.run([sys.executable, "-c", PROBE, policy], capture_output=True, text=True,
                                          check=True).stdout) for policy in ("low", "default")}
    assert freed["low"] > 60  # MiB given back on free
    assert freed["default"] < 4  # kept for the next step's allocation


def test_low_memory_flag_reaches_the_config():
    args = ["train", "--data", "d.jsonl", "--n-layer", "1", "--n-embd", "64"]
    assert build_config(build_parser().parse_args(args + ["--low-memory"])).low_memory is True
    assert build_config(build_parser().parse_args(args)).low_memory is False

HUGE_PROBE = """
import re
from rwkv_sft import cli
cli.main(["--help"])  # what every rwkv-sft command does first
import torch
t = torch.ones(64 << 20)  # 256 MiB, touched
print(re.search(r"AnonHugePages:\\s+(\\d+)", open("/proc/self/smaps_rollup").read()).group(1))
"""


def _thp_mode() -> str:
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return "never"
    return text[text.index("[") + 1:text.index("]")]


@pytest.mark.skipif(_thp_mode() == "never", reason="this kernel gives no transparent huge pages")
def test_the_command_line_puts_large_tensors_on_huge_pages_unless_told_not_to():
    import os

    def huge_kib(**env):
        environ = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
        out = subprocess.run([sys.executable, "-c", HUGE_PROBE], capture_output=True, text=True, check=True,
                             env={**environ, **env}).stdout
        return int(out.split()[-1])

    assert huge_kib() >= 128 << 10  # most of the 256 MiB tensor
    if _thp_mode() == "madvise":  # ("always" gives huge pages to everything)
        assert huge_kib(THP_MEM_ALLOC_ENABLE="0") < 64 << 10  # the user's choice is kept


def test_fsdp_on_several_cpu_processes_takes_the_low_memory_policy(monkeypatch):
    from types import SimpleNamespace

    from rwkv_sft.train import parallel
    chosen = []
    monkeypatch.setattr(parallel.utils, "set_heap_policy", chosen.append)
    for mode, world, low in (("fsdp", 2, False), ("ddp", 2, False), ("fsdp", 1, False), ("ddp", 2, True)):
        monkeypatch.setenv("WORLD_SIZE", str(world))  # as torchrun sets it
        parallel.use_heap_policy(SimpleNamespace(device="cpu", low_memory=low, parallel=mode, base_dtype="auto"))
    assert chosen == [True, False, False, True]


def test_the_train_command_sets_the_policy_and_train_leaves_it_to_its_caller(monkeypatch, tmp_path):
    """The heap policy holds for the whole process: `rwkv-sft train` sets it before train(); a
    Python program that calls train() keeps its own."""
    from types import SimpleNamespace

    from rwkv_sft import cli, utils
    from rwkv_sft.train import loop, train
    from test_train_helpers import tiny_config, tiny_data
    chosen = []
    monkeypatch.setattr(utils, "set_heap_policy", chosen.append)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    train(tiny_config(tmp_path / "python", max_steps=1), data=tiny_data())
    assert chosen == []
    monkeypatch.setattr(loop, "train", lambda config: SimpleNamespace(interrupted=False))  # the command, not the run
    monkeypatch.setattr(cli, "use_huge_pages", lambda: None)  # nor the environment of this test process
    assert cli.main(["train", "--data", "d.jsonl", "--n-layer", "1", "--n-embd", "64", "--device", "cpu",
                     "--low-memory", "--out", str(tmp_path / "cli")]) == 0
    assert chosen == [True]

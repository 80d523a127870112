"""Environment variables: read in one module (rwkv_sft/env.py), each listed in docs/environment.md."""
import re
from pathlib import Path

import pytest

from rwkv_sft import env

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "rwkv_sft"


def test_only_env_py_touches_the_environment():
    readers = [f"{p.relative_to(SRC)}:{n}" for p in sorted(SRC.rglob("*.py")) if p.name != "env.py" or p.parent != SRC
               for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
               if re.search(r"\bos\.(environ|getenv|putenv|unsetenv)\b|\bgetenv\(", line)]
    assert readers == []


def test_every_variable_is_documented():
    names = set(re.findall(r'"([A-Z][A-Z0-9_]{2,})"', (SRC / "env.py").read_text(encoding="utf-8")))
    names |= set(re.findall(r'getenv\("([A-Z0-9_]+)"\)', "".join(p.read_text() for p in (SRC / "ops" / "csrc").iterdir())))
    assert {"RWKV_SFT_CACHE", "THP_MEM_ALLOC_ENABLE", "RWKV_SFT_WKV7_SHARED_LIMIT"} <= names  # the scan finds them
    documented = set(re.findall(r"`([A-Z][A-Z0-9_]{2,})`", (ROOT / "docs" / "environment.md").read_text(encoding="utf-8")))
    assert names - documented == set()


def test_values_are_read_when_asked(monkeypatch, tmp_path):
    monkeypatch.delenv("RWKV_SFT_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    from rwkv_sft.data.cache import default_cache_dir
    assert env.cache_home() == tmp_path / "rwkv_sft" and default_cache_dir() == str(tmp_path / "rwkv_sft" / "data")
    monkeypatch.setenv("RWKV_SFT_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == str(tmp_path / "mine")
    for value, on in (("0", False), (" Off ", False), ("no", False), ("1", True), ("yes", True)):
        monkeypatch.setenv("RWKV_SFT_DECODE_KERNELS", value)
        assert env.decode_kernels() is on
    monkeypatch.delenv("RWKV_SFT_DECODE_KERNELS")
    assert env.decode_kernels() is True


@pytest.mark.parametrize("before", [None, "8.0"])
def test_the_cuda_arch_list_is_put_back(monkeypatch, before):
    if before is None:
        monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    else:
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", before)
    import os
    with pytest.raises(RuntimeError), env.cuda_arch_list("9.0"):
        assert os.environ["TORCH_CUDA_ARCH_LIST"] == "9.0"
        raise RuntimeError("a failed build")
    assert os.environ.get("TORCH_CUDA_ARCH_LIST") == before

"""rwkv-sft installs beside the torch a user already has (pyproject asks for a range), so nothing
under src/ may reach into torch's private modules or names (`torch.*._*`), which change in any
release: no such import, and no such attribute chain on a name bound to torch."""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"


def _private(dotted: str) -> bool:
    return any(part.startswith("_") and not part.startswith("__") for part in dotted.split("."))


def private_torch_uses(source: str) -> list[str]:
    """'line: name' for every private torch module or name that `source` imports or reaches."""
    tree, found = ast.parse(source), []
    torch_names = set()  # local names bound to torch modules or objects
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "torch":
                    torch_names.add(alias.asname or "torch")
                    if _private(alias.name):
                        found.append(f"{node.lineno}: {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "torch":
            for alias in node.names:
                torch_names.add(alias.asname or alias.name)
                if _private(f"{node.module}.{alias.name}"):
                    found.append(f"{node.lineno}: {node.module}.{alias.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            chain, base = [], node
            while isinstance(base, ast.Attribute):
                chain.append(base.attr)
                base = base.value
            if isinstance(base, ast.Name) and base.id in torch_names and _private(".".join(chain)):
                found.append(f"{node.lineno}: {base.id}.{'.'.join(reversed(chain))}")
    return sorted(set(found))


def test_the_check_finds_private_torch_uses():
    source = """
import torch
import torch.distributed as dist
from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather
from torch.distributed import _functional_collectives
from torch.nn.parallel import DistributedDataParallel as DDP
import torch._dynamo
x = torch._C._get_tracing_state()
DDP._set_params_and_buffers_to_ignore_for_model(None, [])
dist.distributed_c10d._get_default_group()
y = torch.nn.functional.relu(torch.ones(1)).__class__
self._private_but_ours = 1
"""
    found = private_torch_uses(source)
    for name in ("torch.distributed.fsdp._fully_shard._fsdp_api.AllGather", "torch.distributed._functional_collectives",
                 "torch._dynamo", "torch._C._get_tracing_state", "DDP._set_params_and_buffers_to_ignore_for_model",
                 "dist.distributed_c10d._get_default_group"):
        assert any(f.endswith(name) for f in found), (name, found)
    assert not any("__class__" in f or "_private_but_ours" in f for f in found), found


def test_no_module_under_src_uses_private_torch():
    offenders = [f"{path.relative_to(SRC)}:{use}" for path in sorted(SRC.rglob("*.py"))
                 for use in private_torch_uses(path.read_text())]
    assert not offenders, offenders

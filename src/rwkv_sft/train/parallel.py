"""Process-level parallelism beside the loop: DDP or FSDP2 wrapping, the gradient sync between
micro-batches, clipping over shards, sharded checkpoints and the full export.

- ddp: every process holds the whole model, its gradients and AdamW's state; gradients are
  all-reduced once per step.
- fsdp: `torch.distributed.fsdp.fully_shard` on the embedding, on every block, on the head and on
  the root (ln0, ln_out): each process keeps 1/N of the parameters, gradients and AdamW state; a
  unit's parameters are gathered just before it runs and freed after it, its gradients
  reduce-scattered after its backward (FSDP2's own collectives, on any backend). With bf16
  precision the gathered parameters are bf16 (half the traffic); gradients are reduced and kept
  in fp32, and the sharded master weights stay fp32. Frozen parameters are sharded too and get
  no gradient. With `offload` (a GPU run) the shards, their gradients and AdamW's state live in
  CPU memory (CPUOffloadPolicy) and the optimizer steps there; one process runs it too.

Checkpoints of an fsdp run hold the model and optimizer as torch.distributed.checkpoint shards
(every process writes its own, in parallel) beside the usual state.pt; they load into any
number of processes, in either mode or in one process without torchrun.
"""
from __future__ import annotations

import contextlib
import functools
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     get_state_dict, set_optimizer_state_dict, set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from .. import env, settings, utils
from ..errors import UserError
from ..weights import export_state_dict
from . import checkpoint as ckpt
from .distributed import Dist

# Blocks return x[:, -1] (the token-shift state) as a view; nothing modifies it in place.
warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
# A sharded checkpoint read by one process without torchrun is meant, not a mistake.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


@dataclass
class Parallel:
    mode: str                   # "none" (one process), "ddp" or "fsdp"
    module: torch.nn.Module     # what runs a micro-batch: the loss module, wrapped

    @property
    def sharded(self) -> bool:
        return self.mode == "fsdp"


def wrap(loss_module, d: Dist, mode: str, precision: str, offload: bool = False) -> Parallel:
    """Wrap `loss_module` (CompletionLoss or PreferenceLoss: `.model`, and `.head_loss`, the module that
    reads the head) for `mode`; one process runs it as it is, unless
    `offload` (fsdp with CPUOffloadPolicy, in a process group of any size).

    Call before making the optimizer: fully_shard replaces the parameters with sharded ones.
    """
    if mode not in settings.choices(settings.Parallel):
        raise ValueError(f"unknown parallel mode {mode!r}")
    if offload and mode != "fsdp":
        raise ValueError("offload needs fsdp")
    if not (d.enabled or offload):
        return Parallel("none", loss_module)
    if mode == "ddp":
        # every process loads or initialises the same weights (same file, same seed): nothing to
        # broadcast, at the start or (buffers: a quantized base's tensors, PiSSA's A0/B0) at each step
        return Parallel("ddp", DDP(loss_module, device_ids=[d.device.index] if d.device.type == "cuda" else None,
                                   init_sync=False, broadcast_buffers=False))
    # The inputs keep their dtype: the recurrent state must stay fp32 whatever the weights are.
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if precision == "bf16" else None,
                                  reduce_dtype=torch.float32, cast_forward_inputs=False)
    shard = functools.partial(fully_shard, mesh=init_device_mesh(d.device.type, (dist.get_world_size(),)),
                              mp_policy=policy, offload_policy=CPUOffloadPolicy() if offload else OffloadPolicy())
    model = loss_module.model
    shard(model.emb)
    for block in model.blocks:
        shard(block)
    # The head runs as the loss (HeadLoss, not the head's forward): that module is the head's unit.
    # Its backward follows at once, so it stays gathered from one to the other (torchtitan's choice
    # for its output layer); the root leaves the head's parameters to it.
    shard(loss_module.head_loss, reshard_after_forward=False)
    shard(loss_module, ignored_params=set(model.head.parameters()))  # the root: ln0, ln_out
    loss_module.lockstep_segments = True  # blocks gather per call: as many segments in every process
    return Parallel("fsdp", loss_module)


def use_heap_policy(config) -> None:
    """On CPU, the C heap's policy (utils.set_heap_policy) for this run's process. It holds for the
    whole process, so the command line sets it before train(), which leaves a Python caller's
    process as it is. fsdp takes `--low-memory`'s: the [V, C] tables it gathers and reduce-scatters
    (several 256 MiB buffers at 1024 x 65536) would stay in the heap; at 8 x 1024 on 2 gloo
    processes the largest process peaks at 3.55 instead of 4.82 GiB (benchmarks/bench_parallel.py).
    A quantized base keeps the default: it fits its memory targets there, and the low-memory policy
    costs it a quarter of its speed (docs/quantized-base.md)."""
    try:
        device = utils.resolve_device(config.device, env.local_rank())
    except UserError:
        return  # train() says what is wrong with it
    if device.type == "cpu":
        utils.set_heap_policy(config.low_memory or (config.parallel == "fsdp" and env.world_size() > 1))


def check_device(config, d: Dist) -> None:
    """What this run's device allows: `--offload cpu` only where the model would be elsewhere."""
    if config.offload and d.device.type != "cuda":
        raise UserError(f"--offload cpu keeps a GPU run's weights in CPU memory; this run is on {d.device.type}, "
                        f"where they are already: drop --offload")
    if config.low_memory and d.device.type != "cpu" and d.is_main:
        print(f"rwkv-sft train: --low-memory shapes the CPU heap only; it changes nothing on {d.device}", flush=True)


@contextlib.contextmanager
def micro_batch(wrapped, last: bool):
    """Around one micro-batch's forward and backward: DDP all-reduces gradients on the step's last
    micro-batch only; FSDP reduce-scatters them after every one (whole gradients are not kept)."""
    if isinstance(wrapped, DDP) and not last:
        with wrapped.no_sync():
            yield
    else:
        yield


@torch.no_grad()
def clip_grad_norm(params, max_norm: float) -> float:
    """clip_grad_norm_ that also works on sharded gradients: the norm is over the whole model,
    summed over every process's shards where they are (also in CPU memory, with offload)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    norm = torch.nn.utils.get_total_norm(local)
    if isinstance(grads[0], DTensor):
        squares = norm.double().square().to(grads[0].device_mesh.device_type)
        dist.all_reduce(squares, group=grads[0].device_mesh.get_group())
        norm = squares.sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)  # as clip_grads_with_norm_
    for g in local:
        g.mul_(scale.to(g.device, g.dtype))
    return float(norm)


@contextlib.contextmanager
def whole_root(par: Parallel):
    """Run the bare model (evaluation, generation) in an fsdp run: every process must take part,
    with the root's, the embedding's and the head's parameters gathered for the duration
    (evaluation reads the head's weight, generation takes its device from the embedding's, which
    offload would leave in CPU memory); the blocks gather themselves when they run."""
    if not par.sharded:
        yield
        return
    model = par.module.model
    units = (par.module, model.emb, par.module.head_loss)
    model.emb.set_reshard_after_forward(False)
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
        model.emb.set_reshard_after_forward(True)


# -- checkpoints -----------------------------------------------------------------------------------
def save_checkpoint(par: Parallel, d: Dist, root, step: int, payload: dict, keep_last: int, model, optimizer) -> Path:
    """Write checkpoint root/step_{step:06d} with everything in `payload` plus the model and the
    optimizer: whole in state.pt (written by rank 0), or as shards written by every process.
    A PEFT run's payload holds its (whole) adapter as "model": its checkpoint is always whole."""
    root = Path(root)
    if par.sharded and "model" not in payload:
        names = [str(ckpt.temp_dir(root, step)) if d.is_main else None]
        dist.broadcast_object_list(names, src=0)
        tmp = Path(names[0])
        if d.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=tmp / ckpt.SHARDS)
        if d.is_main:
            ckpt.save_checkpoint(root, step, {**payload, "sharded": True}, keep_last, tmp=tmp)
    else:
        optim_sd = _whole_optimizer_state(par, model, optimizer)
        if d.is_main:
            model_sd = payload["model"] if "model" in payload else model.state_dict()
            ckpt.save_checkpoint(root, step, {**payload, "model": model_sd, "optimizer": optim_sd}, keep_last)
    if d.enabled:
        dist.barrier()
    return root / f"step_{step:06d}"


def whole_tensors(tensors: dict) -> dict:
    """`tensors` with every shard (DTensor) gathered whole; every process of an fsdp run must call."""
    return {k: v.to(v.device_mesh.device_type).full_tensor() if isinstance(v, DTensor) else v
            for k, v in tensors.items()}


def _whole_optimizer_state(par: Parallel, model, optimizer) -> dict:
    """optimizer.state_dict() (parameters by position), gathered from an fsdp run's shards."""
    if not par.sharded:
        return optimizer.state_dict()
    by_name = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
    index = {name: i for i, name in enumerate(_param_order(model, optimizer))}
    return {"state": {index[k]: v for k, v in by_name["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]]}


def _param_order(model, optimizer) -> list[str]:
    """The optimizer's parameters by name, in the positions of optimizer.state_dict()."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def load_optimizer(par: Parallel, state: dict, path, model, optimizer) -> None:
    """After wrapping and making the optimizer: its state (and a sharded checkpoint's weights),
    whatever number of processes or mode wrote the checkpoint. This run's optimizer settings stay."""
    from .optim import load_optimizer_state
    settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    if state.get("sharded"):
        model_sd, optim_sd = get_state_dict(model, optimizer)
        both = {"model": model_sd, "optimizer": optim_sd}
        dcp.load(both, checkpoint_id=Path(path) / ckpt.SHARDS)  # reshards to this run's layout
        set_state_dict(model, optimizer, model_state_dict=both["model"], optim_state_dict=both["optimizer"])
    elif par.sharded:  # a whole optimizer state (saved in positional order) into sharded parameters
        order = _param_order(model, optimizer)
        saved = state["optimizer"]
        by_name = {"state": {order[i]: v for i, v in saved["state"].items()},
                   "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]]}
        set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
    else:
        load_optimizer_state(optimizer, state["optimizer"])
        return
    for group, mine in zip(optimizer.param_groups, settings):  # a resume may change lr, betas, ...
        group.update(mine)


def full_state_dict(par: Parallel, d: Dist, model) -> dict | None:
    """The whole model's tensors on CPU in rank 0 (None elsewhere); an fsdp run gathers them one
    parameter at a time into that one copy."""
    if par.sharded:
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return sd if d.is_main else None
    return export_state_dict(model) if d.is_main else None


__all__ = ["Parallel", "wrap", "check_device", "micro_batch", "clip_grad_norm", "whole_root", "save_checkpoint",
           "whole_tensors",
           "load_optimizer", "full_state_dict"]

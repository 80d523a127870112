"""Process-level parallelism beside the loop: DDP or FSDP2 wrapping, the gradient sync between
micro-batches, clipping over shards, sharded checkpoints and the full export.

- ddp: every process holds the whole model, its gradients and AdamW's state; gradients are
  all-reduced once per step.
- fsdp: `torch.distributed.fsdp.fully_shard` on every block and on the root (ln_out): each
  process keeps 1/N of the parameters, gradients and AdamW state, and a block's parameters are
  gathered just before it runs and freed after it. The embedding and the head are split by
  vocabulary rows and never gathered (vocab_parallel.py). With bf16 precision the
  gathered parameters are bf16 (half the traffic); gradients are reduced and kept in fp32, and
  the sharded master weights stay fp32. Frozen parameters are sharded too and get no gradient.

Checkpoints of an fsdp run hold the model and optimizer as torch.distributed.checkpoint shards
(every process writes its own, in parallel) beside the usual state.pt; they load into any
number of processes, in either mode or in one process without torchrun.
"""
from __future__ import annotations

import contextlib
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
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter  # FSDP2's custom-collective hooks
from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllocMixin
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from .. import utils
from ..model.checkpoint import export_state_dict
from . import checkpoint as ckpt
from . import exchange, vocab_parallel
from .distributed import Dist

MODES = ("ddp", "fsdp")

# Blocks return x[:, -1] (the token-shift state) as a view; nothing modifies it in place.
warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
# A sharded checkpoint read by one process without torchrun is meant, not a mistake.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


@dataclass
class Parallel:
    mode: str                   # "none" (one process), "ddp" or "fsdp"
    module: torch.nn.Module     # what runs a micro-batch: the loss module, wrapped
    unsharded_accumulation: bool = False  # fsdp: keep gathered weights and full gradients between micro-batches

    @property
    def sharded(self) -> bool:
        return self.mode == "fsdp"


def wrap(loss_module, d: Dist, mode: str, precision: str, unsharded_accumulation: bool | None = None) -> Parallel:
    """Wrap `loss_module` (a CompletionLoss) for `mode`; one process runs it as it is.

    Call before making the optimizer: fully_shard replaces the parameters with sharded ones.
    `unsharded_accumulation` (None: on CPU yes, on GPU no): with several micro-batches per step,
    keep the gathered parameters and unreduced full gradients from one micro-batch to the next,
    so a step communicates once like DDP, at the price of one full copy of both. On a GPU, where
    the gathers overlap the compute and memory is what FSDP is for, every micro-batch gathers and
    reduce-scatters instead.
    """
    if not d.enabled:
        return Parallel("none", loss_module)
    if mode == "ddp":
        # frozen weights come from the same file in every process: nothing to broadcast or reduce
        DDP._set_params_and_buffers_to_ignore_for_model(
            loss_module, [n for n, p in loss_module.named_parameters() if not p.requires_grad]
            + [n for n, _ in loss_module.named_buffers()])  # (a quantized base's tensors, PiSSA's A0/B0)
        return Parallel("ddp", DDP(loss_module, device_ids=[d.device.index] if d.device.type == "cuda" else None))
    if mode != "fsdp":
        raise ValueError(f"unknown parallel mode {mode!r}")
    # The inputs keep their dtype: the recurrent state must stay fp32 whatever the weights are.
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if precision == "bf16" else None,
                                  reduce_dtype=torch.float32, cast_forward_inputs=False)
    # Units: each block and the root (ln_out). The embedding and the head are split by vocabulary
    # rows instead and never gathered (vocab_parallel.py). Measured at 8 x 1024, V 65536, 2 gloo
    # processes (bench_parallel.py, the same heap policy): peak 3.46 -> 3.01 GiB, 45 -> 61 tokens/s
    # (best step) against FSDP units of their own.
    model = loss_module.model
    mesh = init_device_mesh(d.device.type, (d.world_size,))
    vocab_parallel.shard(model, mesh, policy.param_dtype)
    for unit in _fsdp_units(loss_module):  # the root last
        fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=True, ignored_params={model.emb.weight, *model.head.parameters(recurse=False)})
        if dist.get_backend() == "gloo":
            unit.set_custom_all_gather(PairwiseAllGather())
            unit.set_custom_reduce_scatter(PairwiseReduceScatter())
    loss_module.lockstep_segments = True  # blocks gather per call: as many segments in every process
    if unsharded_accumulation is None:
        unsharded_accumulation = d.device.type == "cpu"
    return Parallel("fsdp", loss_module, unsharded_accumulation)


def _fsdp_units(loss_module) -> list:
    model = loss_module.model
    return [*model.blocks, loss_module]


class PairwiseAllGather(DefaultAllocMixin, AllGather):
    """FSDP's all-gather on gloo as one send and one receive per pair of processes, all started
    together (exchange.py: gloo's own all_gather_into_tensor moves the same bytes 2-3x slower,
    440 -> 145 ms for 256 MB on 2 processes). Runs to completion before returning."""

    def __call__(self, output_tensor, input_tensor, group, async_op=False):
        exchange.all_gather_rows(input_tensor, [input_tensor.shape[0]] * group.size(), group, out=output_tensor)
        return None


class PairwiseReduceScatter(DefaultAllocMixin, ReduceScatter):
    """FSDP's reduce-scatter on gloo in n - 1 rounds: send the chunk a process owns to it, receive
    one of ours, add. gloo's own reduce_scatter_tensor: 120 -> 40 ms for a 52 MB block on 2
    processes. One extra chunk of memory; the sum is in a fixed order, so runs repeat exactly."""

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        if op not in (dist.ReduceOp.SUM, dist.ReduceOp.AVG):
            raise ValueError(f"reduce-scatter: only SUM and AVG, got {op}")
        exchange.reduce_scatter_rows(input_tensor, [output_tensor.shape[0]] * group.size(), group, out=output_tensor)
        if op == dist.ReduceOp.AVG:
            output_tensor.div_(group.size())
        return None


def set_heap_policy(config, d: Dist) -> None:
    """On CPU, the C heap's policy for this run (utils.set_heap_policy): `--low-memory`'s or the
    default, in every mode. (fsdp used to need the low-memory one: the [V, C] tables it gathered
    and reduce-scattered stayed in the heap. Split by vocabulary rows they are never gathered, and
    at 8 x 1024, V 65536, 2 gloo processes the default policy costs 2.88 -> 3.04 GiB and gives
    59 -> 80 tokens/s, the median step.)"""
    if d.device.type == "cpu":
        utils.set_heap_policy(config.low_memory)
    elif config.low_memory and d.is_main:
        print(f"rwkv-sft train: --low-memory shapes the CPU heap only; it changes nothing on {d.device}", flush=True)


@contextlib.contextmanager
def micro_batch(wrapped, last: bool, unsharded_accumulation: bool = False):
    """Around one micro-batch's forward and backward: gradients are reduced across processes on
    the step's last micro-batch only (DDP), or on every one unless `unsharded_accumulation` (FSDP)."""
    if isinstance(wrapped, DDP) and not last:
        with wrapped.no_sync():
            yield
    elif isinstance(wrapped, FSDPModule) and unsharded_accumulation:
        wrapped.set_requires_gradient_sync(last)
        wrapped.set_reshard_after_backward(last)
        yield
    else:
        yield


def clip_grad_norm(params, max_norm: float) -> float:
    """clip_grad_norm_ that also works on sharded gradients (the norm is over the whole model)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.nn.utils.get_total_norm(grads)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return float(norm)


@contextlib.contextmanager
def whole_root(par: Parallel):
    """Run the bare model (evaluation, generation) in an fsdp run: every process must take part,
    with the root's, the embedding's and the head's parameters gathered for the duration."""
    if not par.sharded:
        yield
        return
    par.module.unshard()  # the root; the blocks gather themselves when they run
    try:
        with vocab_parallel.gathered(par.module.model):
            yield
    finally:
        par.module.reshard()


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
    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in tensors.items()}


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


__all__ = ["MODES", "Parallel", "wrap", "set_heap_policy", "micro_batch", "clip_grad_norm", "whole_root", "save_checkpoint",
           "whole_tensors",
           "load_optimizer", "full_state_dict"]

"""LoRA and PiSSA on the linear layers of an RWKV-7 model, and frozen weights in a compact dtype.

Written here rather than with HF peft: the adapted layer must keep BlinkDL's parameter name
(`...att.key.weight`) so checkpoints and merges stay in the `.pth` layout, its frozen weight may
be bf16 while the CPU computes in fp32 (upcast one layer at a time), and each LoRA lives inside
the module it adapts so that per-block sharding (FSDP2) shards it with its base.

    y = x W^T + scale * (drop(x) A^T) B^T            scale = alpha / rank
    PiSSA:  A0, B0 = the top `rank` singular directions of W (scale * B0 A0 ~ W's principal part),
            A, B start at A0, B0 and the layer subtracts scale * (x A0^T) B0^T: the residual base
            W - scale * B0 A0 without touching W, so the model is exactly unchanged at step 0,
            the frozen weight stays bit-identical and one merge formula serves both inits.
"""
from __future__ import annotations

import fnmatch
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError
from ..ops.frozen import frozen_linear
from ..settings import LoraInit, check_lora, choices
from .quant import QuantLinear, replace_module

DEFAULT_TARGETS = ("att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value")
INITS = choices(LoraInit)


class FrozenLinear(nn.Linear):
    """An nn.Linear whose frozen weight may be stored in bf16 while the input is fp32."""

    @classmethod
    def around(cls, linear: nn.Linear) -> "FrozenLinear":
        """A new module in the place of `linear` that holds its very parameters (same objects, so
        the keys, the values and whatever refers to them stay)."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        new.weight, new.bias = linear.weight, linear.bias
        return new.train(linear.training)

    def forward(self, x):
        return frozen_linear(x, self.weight)

    def frozen_weight(self) -> torch.Tensor:
        return self.weight


class UpcastEmbedding(nn.Embedding):
    """An nn.Embedding whose frozen table may be stored in bf16: it returns fp32 rows."""

    @classmethod
    def around(cls, emb: nn.Embedding) -> "UpcastEmbedding":
        new = cls(emb.num_embeddings, emb.embedding_dim, emb.padding_idx, emb.max_norm, emb.norm_type,
                  emb.scale_grad_by_freq, emb.sparse, device="meta")
        new.weight = emb.weight
        return new.train(emb.training)

    def forward(self, x):
        return super().forward(x).float()


class LoRALayer(nn.Module):
    """A trainable low-rank update on top of a frozen linear layer (the class it is mixed into:
    FrozenLinear, or quant.QuantLinear for a quantized base); the base's keys do not change."""

    def init_lora(self, rank: int, alpha: float, dropout: float, init: str) -> None:
        out_f, in_f = self.out_features, self.in_features
        dev = next(self.buffers(), None) if not isinstance(self, nn.Linear) else self.weight
        dev = dev.device if dev is not None else None
        self.rank, self.alpha, self.dropout, self.init = rank, float(alpha), float(dropout), init
        self.scale = self.alpha / rank
        self.lora_A = nn.Parameter(torch.zeros(rank, in_f, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(out_f, rank, device=dev))
        if init == "pissa":
            self.register_buffer("lora_A0", torch.zeros(rank, in_f, device=dev))
            self.register_buffer("lora_B0", torch.zeros(out_f, rank, device=dev))

    @torch.no_grad()
    def reset_lora(self) -> None:
        """LoRA: A Kaiming-uniform (as nn.Linear and upstream), B zero. PiSSA: A = A0, B = B0."""
        if self.init == "lora":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            self.lora_B.zero_()
            return
        # randomized SVD (as RWKV-PEFT): a full SVD of every layer would dominate start-up time
        U, S, V = torch.svd_lowrank(self.frozen_weight().float(), q=self.rank, niter=4)
        root = (S / self.scale).sqrt()
        self.lora_A0.copy_(root[:, None] * V.T)
        self.lora_B0.copy_(U * root[None, :])
        self.lora_A.copy_(self.lora_A0)
        self.lora_B.copy_(self.lora_B0)

    def forward(self, x):
        lead, x = x.shape[:-1], x.reshape(-1, self.in_features)  # 2-D: the update below is in place
        y = super().forward(x)
        if self.adapter_on:
            # y += scale * (drop(x) A^T) B^T in place: the base's product saves its input, not y, so
            # autograd allows it, and no [tokens, out] temporary is made (forward or backward)
            h = F.dropout(x, self.dropout, self.training) if self.dropout else x
            if self.init == "pissa":  # both products whole first: their difference is exactly 0 at step 0
                d = F.linear(F.linear(h, self.lora_A), self.lora_B) - F.linear(F.linear(x, self.lora_A0), self.lora_B0)
                y.add_(d.to(y.dtype), alpha=self.scale)
            else:
                y.addmm_(F.linear(h, self.lora_A).to(y.dtype), self.lora_B.to(y.dtype).t(), alpha=self.scale)
        return y.view(*lead, self.out_features)

    adapter_on = True  # False: the frozen layer alone (preference.adapters_off, for the reference model)

    def delta_weight(self) -> torch.Tensor:
        """scale * (B A - B0 A0) in fp32: what a merge adds to the weight."""
        d = self.lora_B.float() @ self.lora_A.float()
        if self.init == "pissa":
            d = d - self.lora_B0.float() @ self.lora_A0.float()
        return d * self.scale


class LoRALinear(LoRALayer, FrozenLinear):
    """nn.Linear + LoRA. `add_lora` puts one in the place of an nn.Linear, holding that layer's weight."""


class QuantLoRALinear(LoRALayer, QuantLinear):
    """A quantized frozen layer + LoRA (a new module holding the quantized tensors and the adapter)."""

    @classmethod
    def from_layers(cls, quant: QuantLinear, lora: LoRALayer | None = None) -> "QuantLoRALinear":
        new = cls(quant.in_features, quant.out_features, quant.kind, dict(quant.named_buffers(recurse=False)))
        if lora is not None:  # keep its adapter (parameters and PiSSA's buffers) as they are
            new.rank, new.alpha, new.dropout, new.init, new.scale = lora.rank, lora.alpha, lora.dropout, lora.init, lora.scale
            new.lora_A, new.lora_B = lora.lora_A, lora.lora_B
            if lora.init == "pissa":
                new.register_buffer("lora_A0", lora.lora_A0)
                new.register_buffer("lora_B0", lora.lora_B0)
        return new


def lora_modules(model: nn.Module) -> dict[str, LoRALayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALayer)}


def match_targets(model: nn.Module, targets) -> list[str]:
    """Names of the linear layers that `targets` choose. A target is a layer name relative to a
    block ("att.key", "ffn.value"), a full name ("blocks.3.att.key") or a glob ("blocks.1?.att.*",
    "*" for every eligible layer). Eligible: every linear layer inside the blocks; the head is not
    (the loss reads its weight directly), so a glob never picks it and naming it is an error."""
    linears = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear))]
    eligible = [n for n in linears if n.startswith("blocks.")]
    targets = [t.strip() for entry in targets for t in entry.split(",") if t.strip()]  # "att.key,ffn.key" too
    if not targets:
        raise UserError("lora_targets is empty: name at least one linear layer (e.g. att.key)")
    chosen = set()
    for target in targets:
        if target in linears and target not in eligible:
            raise UserError(f"lora_targets: {target!r} cannot take LoRA (the loss reads its weight directly); "
                            f"choose among {', '.join(_relative_names(eligible))}")
        hits = [n for n in eligible if n == target or n.endswith("." + target) or fnmatch.fnmatchcase(n, target)]
        if not hits:
            raise UserError(f"lora_targets: {target!r} matches no linear layer of the blocks; the model has "
                            f"{', '.join(_relative_names(eligible))} (in every block)")
        chosen.update(hits)
    return [n for n in eligible if n in chosen]


def _relative_names(linears) -> list[str]:
    seen = []
    for n in linears:
        rel = n.split(".", 2)[2]
        if rel not in seen:
            seen.append(rel)
    return seen


def add_lora(model: nn.Module, targets=DEFAULT_TARGETS, rank: int = 16, alpha: float | None = None,
             dropout: float = 0.0, init: str = "lora", initialize: bool = True) -> list[str]:
    """Put a LoRALinear (a QuantLoRALinear on a quantized base) in the place of each chosen linear
    layer, holding that layer's weight; returns their names.

    initialize=False leaves A and B (and PiSSA's A0, B0) zero, for loading saved values."""
    check_lora(rank, alpha, dropout, init)
    alpha = float(rank if alpha is None else alpha)
    names = match_targets(model, targets)
    modules = dict(model.named_modules())
    for name in names:
        m = modules[name]
        if isinstance(m, LoRALayer):
            raise UserError(f"{name} already has a LoRA adapter")
        if rank > min(m.out_features, m.in_features):
            raise UserError(f"lora_rank {rank} exceeds the size of {name} {[m.out_features, m.in_features]}")
        # a new module around the layer's stored tensors (its parameters or quantized buffers)
        m = QuantLoRALinear.from_layers(m) if isinstance(m, QuantLinear) else LoRALinear.around(m)
        replace_module(model, name, m)
        m.init_lora(rank, alpha, dropout, init)
        if initialize:
            m.reset_lora()
    return names


def compact_frozen(model: nn.Module, dtype: torch.dtype) -> None:
    """Store frozen matrices (linear and embedding weights, the bulk of a model, and the blocks'
    low-rank matrices: 0.4 GiB in fp32 at 2.9B) in `dtype`, keep every other frozen tensor and
    everything that trains in fp32.

    Linear layers are replaced by FrozenLinear (the weight upcast per call), embeddings by
    UpcastEmbedding (fp32 rows), each holding the layer's own parameters.
    On CPU this keeps the compute in fp32 (bf16 matmuls are slower there) without ever holding
    the base in fp32; under GPU autocast the bf16 weights are used as they are.
    """
    for name, module in list(model.named_modules()):
        for key, p in module.named_parameters(recurse=False):
            matrix = (key == "weight" and isinstance(module, (nn.Linear, nn.Embedding))
                      or key in getattr(module, "LOW_RANK", ()))
            want = dtype if matrix and not p.requires_grad else torch.float32
            if p.dtype != want:
                p.data = p.data.to(want)
        if not isinstance(module, (nn.Linear, nn.Embedding)) or module.weight.dtype == torch.float32:
            continue
        if isinstance(module, nn.Linear) and not isinstance(module, FrozenLinear):
            replace_module(model, name, FrozenLinear.around(module))
        elif isinstance(module, nn.Embedding) and not isinstance(module, UpcastEmbedding):
            replace_module(model, name, UpcastEmbedding.around(module))

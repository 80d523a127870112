"""`rwkv-sft convert IN OUT`: between .pth (BlinkDL layout) and .safetensors, optionally changing dtype."""
from __future__ import annotations

from ..errors import UserError

DTYPES = ("bf16", "fp16", "fp32")


def add_arguments(p):
    p.add_argument("source", help="input checkpoint (.pth or .safetensors)")
    p.add_argument("target", help="output file; the extension picks the format (.pth or .safetensors)")
    p.add_argument("--dtype", choices=DTYPES, help="store the weights in this dtype (default: unchanged)")
    p.add_argument("--overwrite", action="store_true", help="replace the output if it exists (never the input)")


def run(args) -> int:
    if not args.target.endswith((".pth", ".safetensors")):
        raise UserError(f"{args.target}: the output must end in .pth or .safetensors")
    from ..utils import refuse_overwrite
    refuse_overwrite([args.source], args.target, args.overwrite)
    import torch

    from .rwkv7 import RWKV7

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(args.dtype)
    model = RWKV7.load(args.source)
    model.save(args.target, dtype=dtype)
    print(f"wrote {args.target}")
    return 0

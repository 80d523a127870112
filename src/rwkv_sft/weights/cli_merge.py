"""`rwkv-sft merge`: fold an adapter's LoRA into its base and write a plain checkpoint."""
from __future__ import annotations

from ..errors import UserError
from .cli_convert import add_format_arguments, output_format, write

DTYPES = ("fp32", "bf16", "fp16")


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, metavar="BASE", help="the base checkpoint the adapter was trained on")
    p.add_argument("--adapter", required=True, metavar="FILE",
                   help="adapter.safetensors of a LoRA run, or one of its checkpoints OUT/checkpoints/step_N")
    p.add_argument("--out", required=True, metavar="MERGED",
                   help="output .pth (BlinkDL layout, loads in the rwkv package) or .safetensors")
    p.add_argument("--dtype", choices=DTYPES, help="store the weights in this dtype (default: the base's)")
    add_format_arguments(p)


def run(args) -> int:
    import torch

    from .checkpoint import load_model
    from ..adapters import apply_adapter

    fmt = output_format(args.out, args)
    model = load_model(args.model)  # memory-mapped; merged one weight at a time while writing
    settings = apply_adapter(model, args.adapter)
    if not settings.lora_rank:
        raise UserError(f"{args.adapter}: holds no LoRA weights (only a learned initial state), so there is "
                        "nothing to merge; use it with --adapter, or its state.pth")
    if settings.state_tuning:
        for block in model.blocks:  # a BlinkDL checkpoint has no place for it
            del block.att.time_state
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(args.dtype)
    write(model, args.out, fmt, args, dtype=dtype or model.emb.weight.dtype)
    print(f"wrote {args.out}: {args.model} + {settings.describe()}")
    if settings.state_tuning:
        print(f"note: the learned initial state is not part of a merged checkpoint; it stays in {args.adapter} "
              "(and the run's state.pth)")
    return 0

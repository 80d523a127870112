"""`rwkv-sft convert IN OUT`: between .pth (BlinkDL layout), .safetensors and a Hugging Face
directory (`--to hf`), optionally changing dtype."""
from __future__ import annotations

from ..errors import UserError
from ..settings import ExportFormat, choices

DTYPES = ("bf16", "fp16", "fp32")
FORMATS = choices(ExportFormat)


def add_arguments(p):
    p.add_argument("source", help="input checkpoint (.pth, .safetensors or a Hugging Face directory)")
    p.add_argument("target", help="output file; the extension picks the format (.pth or .safetensors), "
                                  "or a directory with --to hf")
    p.add_argument("--dtype", choices=DTYPES, help="store the weights in this dtype (default: unchanged)")
    add_format_arguments(p)


def add_format_arguments(p) -> None:
    """--to / --hf-scheme / --overwrite, shared by convert and merge."""
    p.add_argument("--to", choices=FORMATS, help="output format (default: from the extension); hf: a Hugging Face "
                   "directory (config.json, model.safetensors, the World vocabulary) for transformers + fla "
                   "and llama.cpp's convert_hf_to_gguf.py")
    p.add_argument("--hf-scheme", choices=("fla", "rwkv"),
                   help="tensor names of --to hf: fla (fla-hub, loads in transformers; default) or rwkv (BlinkDL's names)")
    p.add_argument("--overwrite", action="store_true", help="replace the output if it exists (never an input)")


def output_format(target: str, args) -> str:
    """The format to write, with one-line errors for a target that does not fit it (checked before
    anything is loaded)."""
    to = args.to
    if args.hf_scheme and to != "hf":
        raise UserError("--hf-scheme names the tensors of a Hugging Face directory: give --to hf with it")
    if to is None:
        if not target.endswith((".pth", ".safetensors")):
            raise UserError(f"{target}: the output must end in .pth or .safetensors (or give --to hf for a "
                            "Hugging Face directory)")
        to = target.rsplit(".", 1)[1]
    elif to != "hf" and not target.endswith("." + to):
        raise UserError(f"{target}: --to {to} writes a .{to} file")
    elif to == "hf" and target.endswith((".pth", ".safetensors")):
        raise UserError(f"{target}: --to hf writes a directory; give a name without .pth/.safetensors")
    from ..utils import refuse_overwrite
    refuse_overwrite([getattr(args, a, None) for a in ("source", "model", "adapter")], target, args.overwrite)
    if to == "hf":
        from .hf import check_target
        check_target(target, args.overwrite)
    return to


def write(model, target: str, fmt: str, args, dtype=None) -> None:
    from .checkpoint import save_model
    if fmt == "hf":
        save_model(model, target, dtype=dtype, hf_scheme=args.hf_scheme or "fla", overwrite=args.overwrite)
    else:
        save_model(model, target, dtype=dtype)


def run(args) -> int:
    fmt = output_format(args.target, args)
    import torch

    from .checkpoint import load_model

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(args.dtype)
    model = load_model(args.source)
    write(model, args.target, fmt, args, dtype=dtype)
    print(f"wrote {args.target}")
    return 0

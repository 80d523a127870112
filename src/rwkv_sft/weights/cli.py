"""`rwkv-sft info CKPT`: what a checkpoint holds, inferred from its shapes."""
from __future__ import annotations

import json


def add_arguments(p):
    p.add_argument("checkpoint", help=".pth (BlinkDL layout), .safetensors, or a training checkpoint OUT/checkpoints/step_N")
    p.add_argument("--json", action="store_true", help="print the configuration as JSON")


def run(args) -> int:
    from .checkpoint import infer_config, read_state_dict

    sd = read_state_dict(args.checkpoint)
    cfg = infer_config(sd, source=args.checkpoint)
    n_params = sum(t.numel() for t in sd.values())
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in sd.values()})
    info = {**cfg.to_dict(), "n_head": cfg.n_head, "parameters": n_params, "dtypes": dtypes}
    if args.json:
        print(json.dumps(info))
    else:
        for key, value in info.items():
            print(f"{key:>15}: {value}")
    return 0

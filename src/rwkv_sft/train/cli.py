"""`rwkv-sft train`: settings from --config FILE (TOML or YAML), then flags, then --set key=value.

Exit codes: 0 when the run finished; 130 / 143 when SIGINT / SIGTERM stopped it after saving a
checkpoint (continue with --resume auto); 2 for a setting or file a user can fix; 1 otherwise.
"""
from __future__ import annotations

import argparse
import functools
import json
import re
import signal
from pathlib import Path

from ..cli_args import add_data_arguments, segment_len, split_set
from ..errors import UserError
from ..settings import one_of

S = argparse.SUPPRESS  # flags the user did not give do not override the file
EXCLUSIVE = (("warmup_steps", "warmup_ratio"),)  # settings that replace each other


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .config import LR_DEFAULTS, TrainConfig
    choices = functools.partial(one_of, TrainConfig)
    p.add_argument("--config", metavar="FILE", help="TOML or YAML file of settings (flags override it)")
    g = p.add_argument_group("data")
    g.add_argument("--data", dest="c:data.train_files", action="append", metavar="FILE", default=S,
                   help="training file (JSONL/JSON); repeat for several; FILE:WEIGHT or FILE*COUNT to weight it")
    g.add_argument("--eval-data", dest="c:data.eval_files", action="append", metavar="FILE", default=S, help="held-out file")
    g.add_argument("--eval-fraction", dest="c:data.eval_fraction", type=float, default=S, help="hold out this fraction of the training data")
    add_data_arguments(g, prefix="c:data.", set_flag=False)
    g = p.add_argument_group("model")
    g.add_argument("--model", dest="c:model", metavar="CKPT", default=S, help="checkpoint to fine-tune (.pth / .safetensors / OUT/checkpoints/step_N)")
    g.add_argument("--n-layer", dest="c:model_config.n_layer", type=int, default=S, help="fresh model: layers")
    g.add_argument("--n-embd", dest="c:model_config.n_embd", type=int, default=S, help="fresh model: width")
    g.add_argument("--head-size", dest="c:model_config.head_size", type=int, default=S)
    g.add_argument("--vocab-size", dest="c:model_config.vocab_size", type=int, default=S)
    g = p.add_argument_group("training")
    g.add_argument("--out", dest="c:out_dir", metavar="DIR", default=S, help="output directory (default runs/run)")
    g.add_argument("--epochs", dest="c:epochs", type=float, default=S)
    g.add_argument("--max-steps", dest="c:max_steps", type=int, default=S, help="optimizer steps (overrides --epochs)")
    g.add_argument("--batch-tokens", dest="c:batch_tokens", type=int, default=S, help="tokens per micro-batch per process")
    g.add_argument("--step-tokens", dest="c:step_tokens", type=int, default=S,
                   help="completion tokens per optimizer step, all processes (gradient accumulation)")
    g.add_argument("--packing", dest="c:packing", action=argparse.BooleanOptionalAction, default=S,
                   help="pack several examples per row; preference pairs: a pair's two completions in one row (default on)")
    g.add_argument("--segment-len", dest="c:segment_len", type=segment_len, default=S, metavar="S|auto",
                   help="run each row S tokens at a time with exact gradients through the state: memory flat in "
                        "length, so --max-len can be 64k+ (default auto: rows longer than --batch-tokens are split; "
                        "0: never)")
    g.add_argument("--lr", dest="c:lr", type=float, default=S,
                   help="default by method: " + ", ".join(f"{k} {v:g}" for k, v in LR_DEFAULTS.items()))
    g.add_argument("--lr-final", dest="c:lr_final", type=float, default=S,
                   help="the last step's lr (default lr/10; cosine and linear schedules)")
    w = g.add_mutually_exclusive_group()
    w.add_argument("--warmup-steps", dest="c:warmup_steps", type=int, default=S,
                   help="linear warmup steps (default 10, at most a tenth of the run; never more than half the run)")
    w.add_argument("--warmup-ratio", dest="c:warmup_ratio", type=float, default=S, metavar="F",
                   help="warmup as a fraction of the run's steps (0 .. 0.5)")
    g.add_argument("--schedule", dest="c:schedule", choices=choices("schedule"), default=S)
    g.add_argument("--weight-decay", dest="c:weight_decay", type=float, default=S)
    g.add_argument("--grad-clip", dest="c:grad_clip", type=float, default=S)
    g.add_argument("--no-l2wrap", dest="c:l2wrap", action="store_false", default=S)
    g.add_argument("--precision", dest="c:precision", choices=choices("precision"), default=S)
    g.add_argument("--activation-checkpointing", dest="c:activation_checkpointing",
                   action=argparse.BooleanOptionalAction, default=S,
                   help="recompute each block in the backward: less memory, ~1/3 more compute (default on with "
                        "LoRA or state tuning, off for full fine-tuning)")
    g.add_argument("--low-memory", dest="c:low_memory", action="store_true", default=S,
                   help="CPU: return freed memory to the system at once: lower peak memory, slower steps")
    g.add_argument("--freeze", dest="c:freeze", action="append", default=S, metavar="PART",
                   help="emb, head, blocks.N, blocks.A-B or a parameter prefix; repeatable")
    g.add_argument("--wkv-backend", dest="c:wkv_backend", default=S, choices=choices("wkv_backend"))
    g.add_argument("--seed", dest="c:seed", type=int, default=S)
    g.add_argument("--device", dest="c:device", default=S, help="auto | cpu | cuda | cuda:N")
    g.add_argument("--parallel", dest="c:parallel", choices=choices("parallel"), default=S,
                   help="under torchrun: ddp (default; every process holds the whole model) or fsdp (parameters, "
                        "gradients and optimizer state sharded across processes)")
    g.add_argument("--offload", dest="c:offload", choices=choices("offload"), default=S,
                   help="with --parallel fsdp on a GPU: parameters, gradients and optimizer state in CPU memory, "
                        "each block brought to the GPU as it runs (a model larger than the GPU; no torchrun needed)")
    g = p.add_argument_group("preference training (pairs {\"prompt\", \"chosen\", \"rejected\"}; docs/preference.md)")
    g.add_argument("--objective", dest="c:objective", choices=choices("objective"), default=S,
                   help="sft (default) or a preference objective on chosen/rejected pairs")
    g.add_argument("--beta", dest="c:beta", type=float, default=S, metavar="B",
                   help="DPO's and SimPO's beta, ORPO's lambda (defaults: dpo 0.1, orpo 0.1, simpo 2)")
    g.add_argument("--simpo-gamma", dest="c:simpo_gamma", type=float, default=S, metavar="G",
                   help="SimPO's reward margin (default 1)")
    g = p.add_argument_group("parameter-efficient fine-tuning (the base stays frozen; OUT/adapter.safetensors)")
    g.add_argument("--lora-rank", dest="c:lora_rank", type=int, default=S, metavar="R", help="train LoRA of rank R (e.g. 16)")
    g.add_argument("--lora-alpha", dest="c:lora_alpha", type=float, default=S, metavar="A", help="LoRA scale is A/R (default A = R)")
    g.add_argument("--lora-targets", dest="c:lora_targets", nargs="+", default=S, metavar="LAYER",
                   help="linear layers: names within a block or globs (default att.receptance att.key att.value "
                        "att.output ffn.key ffn.value)")
    g.add_argument("--lora-dropout", dest="c:lora_dropout", type=float, default=S, metavar="P")
    g.add_argument("--lora-init", dest="c:lora_init", choices=choices("lora_init"), default=S,
                   help="lora: B = 0; pissa: the principal singular directions (the model is unchanged at step 0)")
    g.add_argument("--state-tuning", dest="c:state_tuning", action="store_true", default=S,
                   help="learn each layer's initial WKV state (with --lora-rank: both)")
    g.add_argument("--state-lr", dest="c:state_lr", type=float, default=S, metavar="LR",
                   help="with --lora-rank and --state-tuning: the learned state's lr (default "
                        f"{LR_DEFAULTS['state']:g}; it follows the schedule, scaled by STATE_LR / --lr)")
    g.add_argument("--base-dtype", dest="c:base_dtype", choices=choices("base_dtype"), default=S,
                   help="frozen weights in memory (auto: bf16 when the checkpoint is bf16; int8/nf4: projection "
                        "matrices quantized at load, see docs/quantized-base.md); compute stays fp32 on CPU")
    g = p.add_argument_group("evaluation, checkpoints, output")
    g.add_argument("--eval-every", dest="c:eval_every", type=int, default=S, help="steps (0: only at the end)")
    g.add_argument("--eval-exact-match", dest="c:eval_exact_match", type=int, default=S, help="examples checked for exact match")
    g.add_argument("--save-every", dest="c:save_every", type=int, default=S, help="steps (0: only at the end)")
    g.add_argument("--keep-last", dest="c:keep_last", type=int, default=S)
    g.add_argument("--resume", dest="c:resume", nargs="?", const="auto", default=S, metavar="auto|DIR",
                   help="continue from the newest checkpoint in --out (or from DIR); a resume may change epochs, "
                        "max_steps, lr, state_lr, the warmup and schedule, lora_dropout, evaluation, checkpoints, precision and device, not the model size, "
                        "freeze, data, batch_tokens, step_tokens, packing or seed")
    g.add_argument("--overwrite", dest="c:overwrite", action="store_true", default=S,
                   help="start a new run in an --out that holds one (deletes its checkpoints, metrics and model)")
    g.add_argument("--no-progress", dest="c:progress", action="store_false", default=S)
    g.add_argument("--export", dest="c:export", nargs="+", choices=choices("export"), default=S,
                   metavar="FORMAT", help="what the run writes at the end: pth, safetensors (default both), hf "
                   "(OUT/model.hf, a Hugging Face directory for transformers + fla and llama.cpp)")
    g.add_argument("--report-to", dest="c:report_to", nargs="+", choices=choices("report_to"), default=S,
                   metavar="WHERE", help="mirror metrics.jsonl to tensorboard (default) and/or wandb "
                   "(pip install 'rwkv-sft[wandb]'; WANDB_MODE=offline honoured), or none")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="any setting, e.g. --set eval_every=50 --set data.anchor_fraction=0.5 (a bare text value "
                        "takes the escapes of text flags)")
    for action in p._actions:  # show "--lr LR", not the internal destination name
        if action.dest.startswith("c:") and action.metavar is None and action.nargs != 0 and not action.choices:
            action.metavar = action.option_strings[-1].lstrip("-").upper().replace("-", "_")


def load_config_file(path) -> dict:
    """A TOML (.toml), YAML (.yaml/.yml) or JSON (.json) mapping; errors as 'file:line: problem'."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the config file ({e.strerror if isinstance(e, OSError) else e})") from None
    if path.suffix == ".toml":
        import tomllib
        try:
            d = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            m = re.search(r"\(at line (\d+), column (\d+)\)", str(e))
            where = f"{path}:{m[1]}" if m else str(path)
            raise UserError(f"{where}: invalid TOML: {str(e).split(' (at line')[0]}") from None
    elif path.suffix in (".yaml", ".yml"):
        import yaml
        try:
            d = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise UserError(f"{where}: invalid YAML: {getattr(e, 'problem', None) or e}") from None
    elif path.suffix == ".json":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    else:
        raise UserError(f"{path}: unknown config format (use .toml, .yaml, .yml or .json)")
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise UserError(f"{path}: the config must be a mapping of settings, got {type(d).__name__}")
    return d


def _set(d: dict, key: str, value) -> None:
    *parents, last = key.split(".")
    for part in parents:
        d = d.setdefault(part, {})
        if not isinstance(d, dict):
            raise UserError(f"--set {key}: {part!r} is not a table of settings")
    d[last] = value


def build_config(args):
    from .config import TrainConfig, check_setting
    source = args.config or "command line"
    d = load_config_file(args.config) if args.config else {}
    given = {dest[2:] for dest in vars(args) if dest.startswith("c:")} | {split_set(i)[0] for i in args.sets}
    for one, other in EXCLUSIVE:  # a flag replaces the file's setting of the other kind
        for a, b in ((one, other), (other, one)):
            if a in given and b not in given:
                d.pop(b, None)
    for dest, value in vars(args).items():
        if dest.startswith("c:"):
            _set(d, dest[2:], value)
    for item in args.sets:
        key, value = split_set(item)
        _set(d, key, check_setting(key, value, f"--set {key}"))
    if d.get("model") and "model_config" in d and not d["model_config"]:
        d.pop("model_config")
    return TrainConfig.from_dict(d, source=source).validate()


def run(args) -> int:
    config = build_config(args)  # settings errors come before torch is imported
    from .loop import train
    from .parallel import use_heap_policy
    use_heap_policy(config)  # process-wide, so the command's to set and not train()'s
    result = train(config)
    if result.interrupted:  # as shells expect of a command stopped by a signal (another process may have had it)
        return 128 + (result.signal or signal.SIGTERM)
    return 0

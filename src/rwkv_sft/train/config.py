"""TrainConfig: every setting of a training run (from a TOML/YAML file plus CLI overrides)."""
from __future__ import annotations

import dataclasses
import importlib.util
import math
from dataclasses import dataclass, field

from ..data.config import DataConfig
from ..errors import UserError

# Learning rates by method. LoRA (rank 8, alpha = rank) on `rwkv-sft demo --method lora`: after 20-28
# steps the loss was 7.7 (1e-4, 9 steps), 5.5-5.8 (1e-3), 2.7-2.8 (1e-2); 1e-3 keeps a margin for wider
# models. State tuning: the low end of upstream's range (1 -> 0.01), not yet measured on the demo.
LR_DEFAULTS = {"full": 1e-5, "lora": 1e-3, "state": 1e-2}
BASE_DTYPES = ("auto", "bf16", "fp32", "int8", "nf4")
SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "bf16", "fp32")
PARALLEL = ("ddp", "fsdp")


@dataclass
class TrainConfig:
    data: DataConfig
    model: str | None = None              # checkpoint to fine-tune (.pth/.safetensors); None -> fresh model
    model_config: dict | None = None      # RWKV7Config kwargs for a fresh model (vocab_size defaults to 65536)
    out_dir: str = "runs/run"
    # schedule of work
    epochs: float = 1.0
    max_steps: int | None = None          # optimizer steps; overrides epochs when set
    batch_tokens: int = 4096              # tokens per micro-batch per process (B*T incl. padding)
    step_tokens: int | None = None        # loss tokens per optimizer step, all processes together
                                          # (gradient accumulation); None -> one micro-batch per process
    packing: bool = True
    segment_len: int | None = None        # tokens per row run at a time, exact backprop through the state:
                                          # None -> automatic (a row longer than batch_tokens is split), 0 -> never
    # optimisation (DESIGN.md §5.4)
    lr: float | None = None               # None -> the method's default (LR_DEFAULTS)
    lr_final: float | None = None         # None -> lr / 10 (cosine and linear; constant stays at lr)
    warmup_steps: int | None = None       # None -> warmup_ratio, or 10 steps but at most a tenth of the run;
                                          # at most half the run (longer is shortened with a notice)
    warmup_ratio: float | None = None     # warmup as a fraction of the run's steps (0 .. 0.5)
    schedule: str = "cosine"              # cosine | linear | constant
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-8
    grad_clip: float = 1.0                # 0 -> no clipping
    l2wrap: bool = True
    precision: str = "auto"               # auto | bf16 | fp32 (bf16 autocast, fp32 master weights)
    activation_checkpointing: bool | None = None  # recompute each block in the backward; None -> on for
                                          # PEFT runs (the frozen base's activations are most of their
                                          # memory), off for full fine-tuning
    low_memory: bool = False              # CPU: freed memory back to the OS at once (lower peak, slower steps)
    freeze: list[str] = field(default_factory=list)  # "emb", "head", "blocks.3", "blocks.0-5", any name prefix
    wkv_backend: str = "auto"
    # parameter-efficient fine-tuning: only the adapters train, the base is frozen
    lora_rank: int = 0                    # > 0 turns LoRA on
    lora_alpha: float | None = None       # None -> lora_rank (scale alpha / rank = 1)
    lora_targets: list[str] | None = None  # linear layers; None -> att receptance/key/value/output, ffn key/value
    lora_dropout: float = 0.0
    lora_init: str = "lora"               # lora | pissa
    state_tuning: bool = False            # learn each layer's initial WKV state
    state_lr: float | None = None         # LoRA and a learned state together: the state's peak lr (it follows
                                          # the same schedule, scaled by state_lr / lr); None -> LR_DEFAULTS["state"]
    base_dtype: str = "auto"              # frozen weights: bf16 | fp32 | int8 | nf4 | auto (bf16 when the checkpoint is bf16)
    # preference training on {"prompt", "chosen", "rejected"} pairs (train/preference.py)
    objective: str = "sft"                # sft | dpo | orpo | simpo
    beta: float | None = None             # DPO's and SimPO's beta, ORPO's lambda; None -> the objective's default
    simpo_gamma: float | None = None      # SimPO's reward margin; None -> 1.0
    loss_chunk_size: int | None = None    # rows per chunk of the linear cross-entropy (None -> ~32 MiB of logits)
    # evaluation, checkpoints, logging
    eval_every: int = 0                   # steps; 0 -> only at the end
    eval_exact_match: int = 64            # greedy completions checked for exact match per evaluation
    save_every: int = 0                   # steps; 0 -> only at the end
    keep_last: int = 2
    resume: str | None = None             # "auto" | checkpoint dir | None
    overwrite: bool = False               # a fresh run into an out_dir holding a run deletes that run first
    max_bad_steps: int = 5                # consecutive non-finite steps before the run stops
    log_every: int = 1
    seed: int = 0
    device: str = "auto"                  # auto | cpu | cuda | cuda:N
    export: list[str] = field(default_factory=lambda: ["pth", "safetensors"])
    progress: bool = True
    tensorboard: bool = True              # also log to TensorBoard when it is installed
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])  # tensorboard | wandb | none
    dist_timeout_s: int = 1800            # collectives (and process-group start) give up after this
    parallel: str = "ddp"                 # several processes: ddp (whole model in each) | fsdp (sharded)
    offload: str | None = None            # "cpu" (fsdp on a GPU): parameters, gradients and AdamW's
                                          # state in CPU memory; one process needs no torchrun

    def validate(self) -> "TrainConfig":
        """One-line UserErrors for settings that cannot work."""
        def need(ok, msg):
            if not ok:
                raise UserError(msg)
        need(self.model is None or self.model_config is None or not self.model_config,
             "give either model (a checkpoint) or model_config (a fresh model), not both")
        need(self.model is not None or self.model_config, "no model: give a checkpoint (--model) or a size (--n-layer/--n-embd)")
        need(self.epochs > 0, f"epochs must be positive, got {self.epochs}")
        need(self.max_steps is None or self.max_steps > 0, f"max_steps must be positive, got {self.max_steps}")
        need(self.batch_tokens > 0, f"batch_tokens must be positive, got {self.batch_tokens}")
        need(self.segment_len is None or self.segment_len >= 0, f"segment_len must be >= 0, got {self.segment_len}")
        need(self.step_tokens is None or self.step_tokens > 0, f"step_tokens must be positive, got {self.step_tokens}")
        if self.lr is None:
            self.lr = LR_DEFAULTS[self.method]
        if self.activation_checkpointing is None:
            self.activation_checkpointing = self.method != "full"
        need(self.lr > 0, f"lr must be positive, got {self.lr}")
        need(self.lr_final is None or self.lr_final >= 0, f"lr_final must be >= 0, got {self.lr_final}")
        need(self.warmup_steps is None or self.warmup_ratio is None,
             "give warmup_steps or warmup_ratio, not both")
        need(self.warmup_steps is None or self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        need(self.warmup_ratio is None or 0 <= self.warmup_ratio <= 0.5,
             f"warmup_ratio must be in [0, 0.5] (warmup takes at most half the run), got {self.warmup_ratio}")
        need(self.schedule in SCHEDULES, f"unknown schedule {self.schedule!r}; choose from {', '.join(SCHEDULES)}")
        need(self.schedule != "constant" or self.lr_final is None,
             "schedule constant keeps lr after the warmup: lr_final applies to cosine and linear only")
        need(self.precision in PRECISIONS, f"unknown precision {self.precision!r}; choose from {', '.join(PRECISIONS)}")
        need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"betas must be two numbers in [0, 1), got {self.betas}")
        need(self.grad_clip >= 0 and self.weight_decay >= 0 and self.eps > 0, "grad_clip and weight_decay must be >= 0, eps > 0")
        need(self.keep_last >= 1, f"keep_last must be at least 1, got {self.keep_last}")
        need(self.max_bad_steps >= 1, f"max_bad_steps must be at least 1, got {self.max_bad_steps}")
        need(min(self.eval_every, self.save_every) >= 0 and self.log_every >= 1, "eval_every/save_every must be >= 0, log_every >= 1")
        need(self.eval_exact_match >= 0, f"eval_exact_match must be >= 0, got {self.eval_exact_match}")
        need(0 <= self.seed < 2**63, f"seed must be in [0, 2**63), got {self.seed}")
        need(self.loss_chunk_size is None or self.loss_chunk_size >= 1, f"loss_chunk_size must be >= 1, got {self.loss_chunk_size}")
        need(self.dist_timeout_s >= 1, f"dist_timeout_s must be >= 1, got {self.dist_timeout_s}")
        need(not (self.overwrite and self.resume), "overwrite starts a new run and resume continues one: give one of them")
        need(self.parallel in PARALLEL, f"unknown parallel {self.parallel!r}; choose from {', '.join(PARALLEL)}")
        need(self.offload in (None, "cpu"), f"offload must be cpu, got {self.offload!r}")
        need(self.offload is None or self.parallel == "fsdp",
             "offload cpu shards the model with FSDP: give --parallel fsdp with --offload cpu")
        need(set(self.export) <= {"pth", "safetensors", "hf"}, f"export must list pth, safetensors and/or hf, got {self.export}")
        need(set(self.report_to) <= {"tensorboard", "wandb", "none"} and ("none" not in self.report_to or len(self.report_to) == 1),
             f"report_to must list tensorboard and/or wandb, or be none; got {self.report_to}")
        need("wandb" not in self.report_to or importlib.util.find_spec("wandb") is not None,
             "--report-to wandb: the wandb package is not installed (pip install 'rwkv-sft[wandb]')")
        need(self.lora_rank >= 0, f"lora_rank must be >= 0 (0: no LoRA), got {self.lora_rank}")
        if not self.lora_rank:
            given = [k for k, default in (("lora_alpha", None), ("lora_dropout", 0.0), ("lora_init", "lora"),
                                          ("lora_targets", None)) if getattr(self, k) != default]
            need(not given, f"{', '.join(given)} set but LoRA is off: give lora_rank (--lora-rank R)")
        need(self.lora_init in ("lora", "pissa"), f"lora_init must be lora or pissa, got {self.lora_init!r}")
        need(0 <= self.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        need(self.lora_alpha is None or self.lora_alpha > 0, f"lora_alpha must be positive, got {self.lora_alpha}")
        both = bool(self.lora_rank) and self.state_tuning
        need(self.state_lr is None or both, "state_lr applies when LoRA and a learned state train together "
             "(lora_rank with state_tuning); with state tuning alone, lr is the state's learning rate")
        if both and self.state_lr is None:
            self.state_lr = LR_DEFAULTS["state"]
        need(self.state_lr is None or self.state_lr > 0, f"state_lr must be positive, got {self.state_lr}")
        _validate_objective(self, need)
        need(self.base_dtype in BASE_DTYPES, f"unknown base_dtype {self.base_dtype!r}; choose from {', '.join(BASE_DTYPES)}")
        need(self.base_dtype not in ("int8", "nf4") or self.method != "full",
             f"base_dtype {self.base_dtype} quantizes a frozen base: give lora_rank (--lora-rank R) or state_tuning")
        return self

    @property
    def preference(self) -> bool:
        return self.objective != "sft"

    @property
    def method(self) -> str:
        """full | lora | state (LoRA together with a learned state counts as lora)."""
        return "lora" if self.lora_rank else "state" if self.state_tuning else "full"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "TrainConfig":
        """Build from plain values (a parsed file); unknown keys are errors naming `source`."""
        d = dict(d)
        data = d.pop("data", None)
        if not isinstance(data, dict):
            raise UserError(f"{source}: no data settings (give --data FILE or a [data] table with train_files)")
        _check_keys(d, cls, source)
        data = data_config_from_dict(data, source)
        d = {k: _coerce(v, _field_types(cls)[k], f"{source}: {k}") for k, v in d.items()}
        if "betas" in d:
            d["betas"] = tuple(_coerce(b, "float", f"{source}: betas") for b in d["betas"])
        try:
            return cls(data=data, **d)
        except TypeError as e:
            raise UserError(f"{source}: {e}") from None


def data_config_from_dict(data: dict, source: str = "config") -> DataConfig:
    """The data settings of a file or the command line; errors name `source`."""
    _check_keys(data, DataConfig, f"{source}: data")
    if "train_files" not in data:
        raise UserError(f"{source}: no training data (give --data FILE or data.train_files)")
    data = {k: _coerce(v, _field_types(DataConfig)[k], f"{source}: data.{k}") for k, v in data.items()}
    try:
        return DataConfig(**data)
    except TypeError as e:
        raise UserError(f"{source}: {e}") from None


def check_setting(key: str, value, where: str):
    """One setting given as KEY=VALUE (--set): its name and type checked on its own, so that an
    error names `where` and not the config file it overrides. Returns the value as the field takes it."""
    cls, name = (DataConfig, key[len("data."):]) if key.startswith("data.") else (TrainConfig, key)
    if "." in name:  # inside a mapping (model_config.n_layer): checked where it is used
        return value
    _check_keys({name: value}, cls, where)
    value = _coerce(value, _field_types(cls)[name], where)
    return [_coerce(b, "float", where) for b in value] if name == "betas" and cls is TrainConfig else value


def _check_keys(d: dict, cls, where: str) -> None:
    import difflib
    names = [f.name for f in dataclasses.fields(cls)]
    for key in d:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"{where}: unknown setting {key!r}{hint}")


_TYPES = {"int": int, "float": (int, float), "bool": bool, "str": str, "dict": dict, "None": type(None),
          "list[str]": list, "tuple[float, float]": (list, tuple)}


def _field_types(cls) -> dict[str, str]:
    return {f.name: f.type if isinstance(f.type, str) else f.type.__name__ for f in dataclasses.fields(cls)}


def _coerce(value, annotation: str, where: str):
    """Check a file/CLI value against the field's annotation ("float | None", "list[str]", ...).

    Numbers must be finite. A numeric field also takes a string that spells a number: YAML 1.1
    reads `lr: 1e-4` as a string (it wants `1.0e-4`), and TOML or --set would give the number.
    An int field takes a whole float (`max_steps: 1e4`)."""
    allowed = [_TYPES.get(a.strip(), object) for a in annotation.split("|")]
    if "list[str]" in annotation and isinstance(value, str):
        return [value]  # a single file name where a list is expected
    numeric = next((a.strip() for a in annotation.split("|") if a.strip() in ("int", "float")), None)
    if numeric and isinstance(value, (str, float)) and not isinstance(value, bool):
        if isinstance(value, str):
            try:
                value = float(value.strip().replace("_", "")) if value.strip() else value
            except ValueError:
                raise UserError(f"{where}: expected {annotation}, got {value!r}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{where}: expected a finite number, got {value}")
        if numeric == "int" and isinstance(value, float):
            if not value.is_integer():
                raise UserError(f"{where}: expected a whole number, got {value:g}")
            value = int(value)
    if isinstance(value, bool) and bool not in allowed and object not in allowed:
        raise UserError(f"{where}: expected {annotation}, got {value!r}")
    if not any(isinstance(value, t) for t in allowed):
        raise UserError(f"{where}: expected {annotation}, got {value!r}")
    return float(value) if "float" in annotation and isinstance(value, int) and not isinstance(value, bool) else value


def _validate_objective(c: TrainConfig, need) -> None:
    from .preference import DEFAULT_BETA, DEFAULT_SIMPO_GAMMA, OBJECTIVES
    need(c.objective in OBJECTIVES, f"unknown objective {c.objective!r}; choose from {', '.join(OBJECTIVES)}")
    if c.objective == "sft":
        need(c.beta is None and c.simpo_gamma is None, "beta / simpo_gamma set but the objective is sft: give "
             "--objective dpo|orpo|simpo")
        return
    need(c.objective == "simpo" or c.simpo_gamma is None, f"simpo_gamma is SimPO's; the objective is {c.objective}")
    if c.beta is None:
        c.beta = DEFAULT_BETA[c.objective]
    if c.objective == "simpo" and c.simpo_gamma is None:
        c.simpo_gamma = DEFAULT_SIMPO_GAMMA
    need(math.isfinite(c.beta) and c.beta > 0, f"beta must be a positive number, got {c.beta}")
    need(c.simpo_gamma is None or math.isfinite(c.simpo_gamma), f"simpo_gamma must be a finite number, got {c.simpo_gamma}")
    need(c.parallel != "fsdp" or c.objective != "dpo" or not c.state_tuning,
         "dpo with state tuning under --parallel fsdp: its reference leaves the learned state out, which the "
         "sharded blocks put back; use --parallel ddp")

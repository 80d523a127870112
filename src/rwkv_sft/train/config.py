"""TrainConfig: every setting of a training run (from a TOML/YAML file plus CLI overrides)."""
from __future__ import annotations

import dataclasses
import importlib.util
import math
from dataclasses import dataclass, field

from ..data.config import DataConfig, data_config_from_dict
from ..errors import UserError
from ..settings import (BaseDtype, Count, ExportFormat, LoraAlpha, LoraDropout, LoraInit, NonNegative, NonNegativeInt,
                        Objective, Offload, Parallel, Positive, Precision, Quantized, ReportTo, Schedule, Seed,
                        WarmupRatio, WkvBackend, check_fields, check_keys, choices, coerce, coerce_fields, field_types)

# Learning rates by method. LoRA (rank 8, alpha = rank) on `rwkv-sft demo --method lora`: after 20-28
# steps the loss was 7.7 (1e-4, 9 steps), 5.5-5.8 (1e-3), 2.7-2.8 (1e-2); 1e-3 keeps a margin for wider
# models. State tuning: the low end of upstream's range (1 -> 0.01), not yet measured on the demo.
LR_DEFAULTS = {"full": 1e-5, "lora": 1e-3, "state": 1e-2}


@dataclass
class TrainConfig:
    data: DataConfig
    model: str | None = None              # checkpoint to fine-tune (.pth/.safetensors); None -> fresh model
    model_config: dict | None = None      # RWKV7Config kwargs for a fresh model (vocab_size defaults to 65536)
    out_dir: str = "runs/run"
    # schedule of work
    epochs: Positive = 1.0
    max_steps: Count | None = None        # optimizer steps; overrides epochs when set
    batch_tokens: Count = 4096            # tokens per micro-batch per process (B*T incl. padding)
    step_tokens: Count | None = None      # loss tokens per optimizer step, all processes together
                                          # (gradient accumulation); None -> one micro-batch per process
    packing: bool = True
    segment_len: NonNegativeInt | None = None  # tokens per row run at a time, exact backprop through the state:
                                          # None -> automatic (a row longer than batch_tokens is split), 0 -> never
    # optimisation (docs/rwkv7.md, "Optimisation")
    lr: Positive | None = None            # None -> the method's default (LR_DEFAULTS)
    lr_final: NonNegative | None = None   # None -> lr / 10 (cosine and linear; constant stays at lr)
    warmup_steps: NonNegativeInt | None = None  # None -> warmup_ratio, or 10 steps but at most a tenth of the run;
                                          # at most half the run (longer is shortened with a notice)
    warmup_ratio: WarmupRatio | None = None  # warmup as a fraction of the run's steps (0 .. 0.5)
    schedule: Schedule = "cosine"
    weight_decay: NonNegative = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    eps: Positive = 1e-8
    grad_clip: NonNegative = 1.0          # 0 -> no clipping
    l2wrap: bool = True
    precision: Precision = "auto"         # bf16: autocast, fp32 master weights
    activation_checkpointing: bool | None = None  # recompute each block in the backward; None -> on for
                                          # PEFT runs (the frozen base's activations are most of their
                                          # memory), off for full fine-tuning
    low_memory: bool = False              # CPU: freed memory back to the OS at once (lower peak, slower steps)
    freeze: list[str] = field(default_factory=list)  # "emb", "head", "blocks.3", "blocks.0-5", any name prefix
    wkv_backend: WkvBackend = "auto"
    # parameter-efficient fine-tuning: only the adapters train, the base is frozen
    lora_rank: NonNegativeInt = 0         # > 0 turns LoRA on
    lora_alpha: LoraAlpha | None = None   # None -> lora_rank (scale alpha / rank = 1)
    lora_targets: list[str] | None = None  # linear layers; None -> att receptance/key/value/output, ffn key/value
    lora_dropout: LoraDropout = 0.0
    lora_init: LoraInit = "lora"
    state_tuning: bool = False            # learn each layer's initial WKV state
    state_lr: Positive | None = None      # LoRA and a learned state together: the state's peak lr (it follows
                                          # the same schedule, scaled by state_lr / lr); None -> LR_DEFAULTS["state"]
    base_dtype: BaseDtype = "auto"        # frozen weights (auto: bf16 when the checkpoint is bf16)
    # preference training on {"prompt", "chosen", "rejected"} pairs (train/preference.py)
    objective: Objective = "sft"
    beta: Positive | None = None          # DPO's and SimPO's beta, ORPO's lambda; None -> the objective's default
    simpo_gamma: float | None = None      # SimPO's reward margin; None -> 1.0
    loss_chunk_size: Count | None = None  # rows per chunk of the linear cross-entropy (None -> ~32 MiB of logits)
    # evaluation, checkpoints, logging
    eval_every: NonNegativeInt = 0        # steps; 0 -> only at the end
    eval_exact_match: NonNegativeInt = 64  # greedy completions checked for exact match per evaluation
    save_every: NonNegativeInt = 0        # steps; 0 -> only at the end
    keep_last: Count = 2
    resume: str | None = None             # "auto" | checkpoint dir | None
    overwrite: bool = False               # a fresh run into an out_dir holding a run deletes that run first
    max_bad_steps: Count = 5              # consecutive non-finite steps before the run stops
    log_every: Count = 1
    seed: Seed = 0
    device: str = "auto"                  # auto | cpu | cuda | cuda:N
    export: list[ExportFormat] = field(default_factory=lambda: ["pth", "safetensors"])
    progress: bool = True
    tensorboard: bool = True              # also log to TensorBoard when it is installed
    report_to: list[ReportTo] = field(default_factory=lambda: ["tensorboard"])
    dist_timeout_s: Count = 1800          # collectives (and process-group start) give up after this
    parallel: Parallel = "ddp"            # several processes: ddp (whole model in each) | fsdp (sharded)
    offload: Offload | None = None        # cpu (fsdp on a GPU): parameters, gradients and AdamW's
                                          # state in CPU memory; one process needs no torchrun

    def validate(self) -> "TrainConfig":
        """One-line UserErrors for settings that cannot work."""
        def need(ok, msg):
            if not ok:
                raise UserError(msg)
        need(self.model is None or self.model_config is None or not self.model_config,
             "give either model (a checkpoint) or model_config (a fresh model), not both")
        need(self.model is not None or self.model_config, "no model: give a checkpoint (--model) or a size (--n-layer/--n-embd)")
        check_fields(self)  # each setting's choices and range, as its type says
        if self.lr is None:
            self.lr = LR_DEFAULTS[self.method]
        if self.activation_checkpointing is None:
            self.activation_checkpointing = self.method != "full"
        need(self.warmup_steps is None or self.warmup_ratio is None,
             "give warmup_steps or warmup_ratio, not both")
        need(self.schedule != "constant" or self.lr_final is None,
             "schedule constant keeps lr after the warmup: lr_final applies to cosine and linear only")
        need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"betas must be two numbers in [0, 1), got {self.betas}")
        need(not (self.overwrite and self.resume), "overwrite starts a new run and resume continues one: give one of them")
        need(self.offload is None or self.parallel == "fsdp",
             "offload cpu shards the model with FSDP: give --parallel fsdp with --offload cpu")
        need("none" not in self.report_to or len(self.report_to) == 1,
             f"report_to must list tensorboard and/or wandb, or be none; got {self.report_to}")
        need("wandb" not in self.report_to or importlib.util.find_spec("wandb") is not None,
             "--report-to wandb: the wandb package is not installed (pip install 'rwkv-sft[wandb]')")
        if not self.lora_rank:
            given = [k for k, default in (("lora_alpha", None), ("lora_dropout", 0.0), ("lora_init", "lora"),
                                          ("lora_targets", None)) if getattr(self, k) != default]
            need(not given, f"{', '.join(given)} set but LoRA is off: give lora_rank (--lora-rank R)")
        both = bool(self.lora_rank) and self.state_tuning
        need(self.state_lr is None or both, "state_lr applies when LoRA and a learned state train together "
             "(lora_rank with state_tuning); with state tuning alone, lr is the state's learning rate")
        if both and self.state_lr is None:
            self.state_lr = LR_DEFAULTS["state"]
        _validate_objective(self, need)
        need(self.base_dtype not in choices(Quantized) or self.method != "full",
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
        d = coerce_fields(d, cls, source)
        data = data_config_from_dict(data, source)
        try:
            return cls(data=data, **d)
        except TypeError as e:
            raise UserError(f"{source}: {e}") from None


def check_setting(key: str, value, where: str):
    """One setting given as KEY=VALUE (--set): its name and type checked on its own, so that an
    error names `where` and not the config file it overrides. Returns the value as the field takes it."""
    cls, name = (DataConfig, key[len("data."):]) if key.startswith("data.") else (TrainConfig, key)
    if "." in name:  # inside a mapping (model_config.n_layer): checked where it is used
        return value
    check_keys({name: value}, cls, where)
    return coerce(value, field_types(cls)[name], where)


def _validate_objective(c: TrainConfig, need) -> None:
    from .preference import DEFAULT_BETA, DEFAULT_SIMPO_GAMMA
    if c.objective == "sft":
        need(c.beta is None and c.simpo_gamma is None, "beta / simpo_gamma set but the objective is sft: give "
             "--objective dpo|orpo|simpo")
        return
    need(c.objective == "simpo" or c.simpo_gamma is None, f"simpo_gamma is SimPO's; the objective is {c.objective}")
    if c.beta is None:
        c.beta = DEFAULT_BETA[c.objective]
    if c.objective == "simpo" and c.simpo_gamma is None:
        c.simpo_gamma = DEFAULT_SIMPO_GAMMA
    need(c.simpo_gamma is None or math.isfinite(c.simpo_gamma), f"simpo_gamma must be a finite number, got {c.simpo_gamma}")
    need(c.parallel != "fsdp" or c.objective != "dpo" or not c.state_tuning,
         "dpo with state tuning under --parallel fsdp: its reference leaves the learned state out, which the "
         "sharded blocks put back; use --parallel ddp")

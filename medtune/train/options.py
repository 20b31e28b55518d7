"""Training options shared by every backend, and what a run returns."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from medtune.core.errors import BadInput

FINE_TUNE_TYPES = ("lora", "dora", "full")
SCHEDULES = ("constant", "cosine", "linear")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")


@dataclass
class TrainOptions:
    fine_tune_type: str = "lora"
    iters: int = 100  # optimizer steps (each takes grad_accum micro-batches); see also epochs
    epochs: float | None = None  # when set, overrides iters: passes over the training set
    batch_size: int = 4
    grad_accum: int = 1
    num_layers: int = 8  # layers (from the top) that are trained; -1 = all
    rank: int = 8
    alpha: float | None = None  # LoRA alpha; scale = alpha / rank (overrides scale)
    scale: float = 20.0
    dropout: float = 0.0
    target_modules: list[str] | None = None  # e.g. ["q_proj", "v_proj"]; None = every linear layer
    lr: float = 1e-4
    lr_schedule: str = "constant"
    warmup: int = 0  # steps of linear warm-up
    max_seq_length: int = 2048
    grad_checkpoint: bool = False
    mask_prompt: bool = True
    seed: int = 0
    steps_per_eval: int = 50
    val_batches: int = -1  # -1 = the whole validation set
    save_every: int = 100
    keep_checkpoints: int = 2
    test: bool = False  # evaluate on test.jsonl at the end
    # PyTorch backends (torch, unsloth). None = 4-bit for models over 3B parameters on CUDA.
    load_in_4bit: bool | None = None
    precision: str = "auto"  # auto: bf16 on Ampere and newer, fp16 + loss scaling before (T4), fp32 on CPU

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def lora_scale(self) -> float:
        return self.alpha / self.rank if self.alpha is not None else self.scale

    def check(self) -> "TrainOptions":
        def bad(msg, hint):
            raise BadInput(msg, hint=hint)

        if self.fine_tune_type not in FINE_TUNE_TYPES:
            bad(f"--fine-tune-type must be one of {', '.join(FINE_TUNE_TYPES)}", "lora is the default")
        if self.precision not in PRECISIONS:
            bad(f"--precision must be one of {', '.join(PRECISIONS)}", "auto picks what the device supports")
        if self.lr_schedule not in SCHEDULES:
            bad(f"--lr-schedule must be one of {', '.join(SCHEDULES)}", "cosine with --warmup is a good default")
        for name in ("iters", "batch_size", "grad_accum", "rank", "max_seq_length", "steps_per_eval", "save_every"):
            if getattr(self, name) < 1:
                bad(f"--{name.replace('_', '-')} must be at least 1", f"e.g. --{name.replace('_', '-')} {max(1, getattr(TrainOptions, name))}")
        if not 0 <= self.dropout < 1:
            bad("--dropout must be in [0, 1)", "e.g. --dropout 0.05")
        if self.lr <= 0:
            bad("--lr must be positive", "e.g. --lr 1e-4")
        if self.warmup < 0 or self.warmup >= max(self.iters, 1) and self.epochs is None and self.warmup:
            bad(f"--warmup {self.warmup} must be below the number of steps ({self.iters})", "e.g. --warmup 10")
        if self.epochs is not None and self.epochs <= 0:
            bad("--epochs must be positive", "e.g. --epochs 2")
        return self

    def steps_for(self, n_records: int) -> int:
        """Optimizer steps: --iters, or --epochs over n_records."""
        if self.epochs is None:
            return self.iters
        per_epoch = max(1, n_records // self.batch_size)
        return max(1, math.ceil(self.epochs * per_epoch / self.grad_accum))


def option_names() -> set[str]:
    return {f.name for f in fields(TrainOptions)}


@dataclass
class TrainResult:
    out: Path
    adapter_file: Path
    steps: int
    final_train_loss: float | None
    final_val_loss: float | None
    first_val_loss: float | None
    tokens_per_second: float
    seconds: float
    trainable_parameters: int
    total_parameters: int
    resumed_from: int | None = None
    test_loss: float | None = None
    backend: str = "mlx"
    peak_memory_gb: float | None = None
    preflight: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out"], d["adapter_file"] = str(self.out), str(self.adapter_file)
        return d

"""Training options shared by every backend, and what a run returns."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

from medtune.core.errors import BadInput
from medtune.core.options import option

FINE_TUNE_TYPES = ("lora", "dora", "full")
METHODS = ("sft", "dpo", "orpo")  # what the loss trains on: completions, or preference pairs
SCHEDULES = ("constant", "cosine", "linear")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")


@dataclass
class TrainOptions:
    """Every backend's training options: the flags of `medtune train`, the keys of its --config YAML and of the
    `train:` section of `medtune run`'s config (medtune.core.options)."""

    fine_tune_type: str = option("lora", "lora | dora | full.")
    iters: int = option(100, "Optimizer steps (each takes --grad-accum micro-batches).")
    epochs: float | None = option(None, "Passes over the data (overrides --iters).")
    batch_size: int = option(4, "Records per micro-batch.")
    grad_accum: int = option(1, "Micro-batches per optimizer step.")
    num_layers: int = option(8, "Layers (from the top) that are trained; -1 = all.")
    rank: int = option(8, "LoRA rank.")
    alpha: float | None = option(None, "LoRA alpha (scale = alpha / rank).")
    scale: float = option(20.0, "LoRA scale (when --alpha is not given).")
    dropout: float = option(0.0, "LoRA dropout.")
    target_modules: list[str] | None = option(
        None, "Comma-separated, e.g. q_proj,v_proj (default: all linear).", cli_type=Optional[str]
    )
    lr: float = option(1e-4, "Peak learning rate.")
    lr_schedule: str = option("constant", "constant | cosine | linear.")
    warmup: int = option(0, "Warm-up steps.")
    max_seq_length: int = option(2048, "Longest record allowed (tokens); longer ones are refused, never cut.")
    grad_checkpoint: bool = option(False, "Trade compute for memory.", flags=("--grad-checkpoint",))
    mask_prompt: bool = option(True, "Loss on the answer only.", flags=("--mask-prompt/--no-mask-prompt",))
    seed: int = option(0, "Random seed.")
    eval_every: int = option(50, "Steps between validation passes.", aliases=("steps_per_eval",))
    val_batches: int = option(-1, "Validation batches per pass; -1 = all.")
    save_every: int = option(100, "Steps between checkpoints.")
    keep_checkpoints: int = option(2, "Checkpoints kept (the newest).")
    test: bool = option(False, "Evaluate loss/perplexity on test.jsonl at the end.", flags=("--test",))
    load_in_4bit: bool | None = option(
        None,
        "torch/unsloth: QLoRA on a 4-bit base (bitsandbytes, CUDA); default: on for models over 3B parameters on CUDA.",
        flags=("--load-in-4bit/--no-load-in-4bit",),
    )
    method: str = option(
        "sft",
        "sft (prompt/completion data) | dpo | orpo (preference pairs from `medtune prepare`: prompt, chosen, "
        "rejected). mlx and torch backends.",
    )
    adapter: Path | None = option(
        None,
        "Start from an earlier adapter's weights (an mlx_lm or PEFT LoRA, e.g. SFT before DPO, or a run on other "
        "data), with a fresh optimizer and schedule; its rank, scale, modules and layers are the adapter's. DPO's "
        "reference is the model with it. mlx and torch backends.",
        flags=("--init-adapter", "--adapter"),
        aliases=("init_adapter",),
        cli_type=Optional[Path],
    )
    beta: float = option(0.1, "DPO: how far the policy may move from the reference (higher: closer).")
    orpo_lambda: float = option(0.1, "ORPO: weight of the odds-ratio term beside the chosen side's SFT loss.")
    precision: str = option(
        "auto",
        "torch/unsloth: auto | fp32 | fp16 | bf16. auto: bf16 on Ampere and newer, fp16 "
        "with loss scaling before (T4), fp32 on CPU.",
    )

    def __post_init__(self):
        if isinstance(self.target_modules, str):  # the command line's and a YAML file's comma-separated form
            self.target_modules = [x.strip() for x in self.target_modules.split(",") if x.strip()]

    @property
    def steps_per_eval(self) -> int:  # the name the backends read
        return self.eval_every

    def to_dict(self) -> dict:
        d = asdict(self)
        d["adapter"] = str(self.adapter) if self.adapter is not None else None
        return d

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
        for name in ("iters", "batch_size", "grad_accum", "rank", "max_seq_length", "eval_every", "save_every"):
            if getattr(self, name) < 1:
                bad(
                    f"--{name.replace('_', '-')} must be at least 1",
                    f"e.g. --{name.replace('_', '-')} {max(1, getattr(TrainOptions, name))}",
                )
        if not 0 <= self.dropout < 1:
            bad("--dropout must be in [0, 1)", "e.g. --dropout 0.05")
        if self.lr <= 0:
            bad("--lr must be positive", "e.g. --lr 1e-4")
        if self.warmup < 0 or self.warmup >= max(self.iters, 1) and self.epochs is None and self.warmup:
            bad(f"--warmup {self.warmup} must be below the number of steps ({self.iters})", "e.g. --warmup 10")
        if self.epochs is not None and self.epochs <= 0:
            bad("--epochs must be positive", "e.g. --epochs 2")
        self._check_method(bad)
        return self

    def _check_method(self, bad) -> None:
        if self.method not in METHODS:
            bad(f"--method must be one of {', '.join(METHODS)}", "sft on prompt/completion data, dpo or orpo on pairs")
        if self.method != "sft" and self.grad_accum != 1:
            bad(f"--method {self.method} takes --grad-accum 1 for now", "raise --batch-size instead")
        if self.beta <= 0 or self.orpo_lambda < 0:
            bad("--beta must be positive and --orpo-lambda not negative", "e.g. --beta 0.1 --orpo-lambda 0.1")

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

"""Training options shared by every backend, and what a run returns."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class TrainOptions:
    iters: int = 100
    batch_size: int = 4
    num_layers: int = 8  # layers (from the top) that get LoRA; -1 = all
    rank: int = 8
    scale: float = 20.0
    dropout: float = 0.0
    lr: float = 1e-4
    max_seq_length: int = 2048
    mask_prompt: bool = True
    seed: int = 0
    steps_per_eval: int = 50
    val_batches: int = -1  # -1 = whole validation set
    save_every: int = 100

    def to_dict(self) -> dict:
        return asdict(self)


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
    files: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out"], d["adapter_file"] = str(self.out), str(self.adapter_file)
        return d

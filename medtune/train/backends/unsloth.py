"""Unsloth on a CUDA GPU: FastLanguageModel loads the model (4-bit or 16-bit) and attaches LoRA with its
own kernels and gradient checkpointing ("unsloth": activations offloaded); everything else is the torch
backend's, so data, masking, progress, checkpoints, resume, metrics and the PEFT adapter are the same.

Refused (exit 3) where Unsloth is not installed or no CUDA GPU is visible; options it cannot honour (full
fine-tune, fp32, several processes) are refused before anything is loaded.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys

from medtune.core.errors import MissingDependency
from medtune.train.backends.torch import TorchBackend, decoder_layers, resolve_targets
from medtune.train.options import TrainOptions


class UnslothBackend(TorchBackend):
    name = "unsloth"
    uses = ("unsloth", "torch", "peft")
    always_checkpoints = True

    @classmethod
    def refuses(cls, opts: TrainOptions) -> list[tuple[str, str]]:
        found = super().refuses(opts)
        if opts.method != "sft":  # its fused loss takes labels, not the pairs' completion log-probs
            found.append((f"--method {opts.method} is not supported with --backend unsloth", "use --backend torch"))
        if opts.fine_tune_type == "full":
            found.append(
                (
                    "--fine-tune-type full is not supported with --backend unsloth (LoRA/DoRA only here)",
                    "use --backend torch for a full fine-tune",
                )
            )
        if opts.precision == "fp32":
            found.append(
                (
                    "--precision fp32 is not supported with --backend unsloth (16-bit kernels)",
                    "use --precision auto, or --backend torch",
                )
            )
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            found.append(
                (
                    "--backend unsloth runs on one GPU; this process was launched as one of several",
                    "use --backend torch under torchrun / accelerate launch",
                )
            )
        return found

    def check_available(self) -> None:
        check_available()
        with contextlib.redirect_stdout(sys.stderr):
            import unsloth  # noqa: F401 - first, before transformers: it patches transformers and PEFT on import
        super().check_available()

    def load_model(self):
        return load_with_unsloth(self.model_ref.path, self.opts, self.plan, self.layer_ids, self.n_total)


def check_available() -> None:
    if importlib.util.find_spec("unsloth") is None:
        raise MissingDependency(
            "Unsloth is not installed (--backend unsloth)",
            hint='on a CUDA machine: pip install "medtune[unsloth]"; or use --backend torch',
        )
    if importlib.util.find_spec("torch") is None:
        raise MissingDependency("PyTorch is not installed (--backend unsloth)", hint='pip install "medtune[unsloth]"')
    import torch

    if not torch.cuda.is_available():
        raise MissingDependency(
            "Unsloth needs a CUDA GPU and none is visible here",
            hint="use --backend torch (CPU or CUDA) or --backend mlx; on Colab/Kaggle choose a GPU runtime",
        )


def load_with_unsloth(path, opts: TrainOptions, plan, layer_ids, n_total):
    import torch
    import torch.nn as nn
    from unsloth import FastLanguageModel

    from medtune.core import safety

    with contextlib.redirect_stdout(sys.stderr):  # Unsloth's banners must not mix with --json on stdout
        model, _tokenizer = FastLanguageModel.from_pretrained(
            model_name=str(path),
            max_seq_length=opts.max_seq_length,
            dtype=getattr(torch, plan.dtype),
            load_in_4bit=plan.load_in_4bit,
            trust_remote_code=safety.trust_remote_code(),
        )
        layer = decoder_layers(model)[0]
        targets = resolve_targets(
            [n for n, m in layer.named_modules() if isinstance(m, nn.Linear)], opts.target_modules
        )
        extra = {"use_dora": True} if opts.fine_tune_type == "dora" else {}
        if extra:
            plan.notes.append("Unsloth's fast LoRA kernels do not cover DoRA: DoRA layers run on PEFT's path")
        model = FastLanguageModel.get_peft_model(
            model,
            r=opts.rank,
            target_modules=targets,
            lora_alpha=opts.lora_scale * opts.rank,
            lora_dropout=opts.dropout,
            bias="none",
            layers_to_transform=None if len(layer_ids) == n_total else layer_ids,
            use_gradient_checkpointing="unsloth",
            random_state=opts.seed,
            use_rslora=False,
            **extra,
        )
    # Loss scaling (fp16) and Adam want float32 adapter weights; Unsloth's kernels cast them per matmul.
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model

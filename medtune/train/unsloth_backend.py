"""Unsloth on a CUDA GPU: FastLanguageModel loads the model (4-bit or 16-bit) and attaches LoRA with its
own kernels and gradient checkpointing ("unsloth": activations offloaded); torch_backend's loop trains
it, so data, masking, progress, checkpoints, resume, metrics and the PEFT adapter are the same.

Imported only when chosen. Refused (exit 3) where Unsloth is not installed or no CUDA GPU is visible;
options it cannot honour (full fine-tune, fp32, several processes) are refused in medtune.train.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys

from medtune.core.errors import MissingDependency
from medtune.train import torch_backend
from medtune.train.options import TrainOptions, TrainResult


def check_available() -> None:
    if importlib.util.find_spec("unsloth") is None:
        raise MissingDependency("Unsloth is not installed (--backend unsloth)",
                                hint='on a CUDA machine: pip install "medtune[unsloth]"; or use --backend torch')
    if importlib.util.find_spec("torch") is None:
        raise MissingDependency("PyTorch is not installed (--backend unsloth)", hint='pip install "medtune[unsloth]"')
    import torch

    if not torch.cuda.is_available():
        raise MissingDependency("Unsloth needs a CUDA GPU and none is visible here",
                                hint="use --backend torch (CPU or CUDA) or --backend mlx; on Colab/Kaggle choose a GPU runtime")


def load_with_unsloth(path, opts: TrainOptions, plan, device, layer_ids, n_total, target_names):
    import torch
    import torch.nn as nn
    from unsloth import FastLanguageModel

    from medtune.core import safety
    with contextlib.redirect_stdout(sys.stderr):  # Unsloth's banners must not mix with --json on stdout
        model, _tokenizer = FastLanguageModel.from_pretrained(
            model_name=str(path), max_seq_length=opts.max_seq_length, dtype=getattr(torch, plan.dtype),
            load_in_4bit=plan.load_in_4bit, trust_remote_code=safety.trust_remote_code())
        layer = torch_backend.decoder_layers(model)[0]
        targets = torch_backend.resolve_targets([n for n, m in layer.named_modules() if isinstance(m, nn.Linear)],
                                                target_names)
        extra = {"use_dora": True} if opts.fine_tune_type == "dora" else {}
        if extra:
            plan.notes.append("Unsloth's fast LoRA kernels do not cover DoRA: DoRA layers run on PEFT's path")
        model = FastLanguageModel.get_peft_model(
            model, r=opts.rank, target_modules=targets, lora_alpha=opts.lora_scale * opts.rank,
            lora_dropout=opts.dropout, bias="none", layers_to_transform=None if len(layer_ids) == n_total else layer_ids,
            use_gradient_checkpointing="unsloth", random_state=opts.seed, use_rslora=False, **extra)
    # Loss scaling (fp16) and Adam want float32 adapter weights; Unsloth's kernels cast them per matmul.
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


def train(model_spec: str, data, out, opts: TrainOptions, progress=None, *, resume: bool = False,
          dry_run: bool = False, on_step=None) -> TrainResult:
    check_available()
    with contextlib.redirect_stdout(sys.stderr):
        import unsloth  # noqa: F401 - first, before transformers: it patches transformers and PEFT on import
    return torch_backend.train(model_spec, data, out, opts, progress=progress, resume=resume, dry_run=dry_run,
                               on_step=on_step, backend="unsloth", loader=load_with_unsloth)

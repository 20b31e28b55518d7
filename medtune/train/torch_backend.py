"""LoRA/DoRA/QLoRA/full fine-tuning on PyTorch: transformers + PEFT, on a CUDA GPU or a CPU.

The same job as mlx_backend, on the same terms: the prepared records go through medtune.data.encode
(the rendering prepare checked), the loss covers exactly the same tokens, batches come in the same
seeded order, and the run writes the same metrics.jsonl, loss.png, checkpoints and manifest. The
adapter is a PEFT folder (adapter_config.json + adapter_model.safetensors) that `medtune fuse` merges.

Our own short loop rather than TRL's Trainer, so that progress, checkpoints (adapter, optimizer,
scheduler, loss scaler, RNG states, data position), bit-exact resume, Ctrl-C and the metrics are the
ones the MLX backend has.

On CUDA: bf16 on Ampere and newer; before (T4, V100) fp16 autocast with a GradScaler, since those GPUs
have no bf16. Models over 3B parameters load in 4-bit (QLoRA, bitsandbytes NF4) unless told otherwise.
Launched by torchrun / accelerate launch, it trains data-parallel: --batch-size is the global batch,
each process takes its share of every batch, and gradients are combined weighted by label tokens, so N
processes compute what one process would on the whole batch. Only rank 0 writes.

unsloth_backend reuses all of this with Unsloth's model loading. The data helpers (records, batch order,
checkpoint listing, the Interrupted exit) are mlx_backend's own, which imports numpy, not mlx.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from medtune.core import fsutil, redact
from medtune.core.errors import BadInput, ResourceError, require
from medtune.train.mlx_backend import (
    PAD_MULTIPLE,
    Interrupted,
    batch_order,
    build_dataset,
    checkpoint_dirs,
    load_jsonl,
)
from medtune.train.options import TrainOptions, TrainResult
from medtune.train.report import MetricsLog, StopOnSignal, log_line, log_validation, plot_losses

IGNORE = -100  # label of a position that gets no loss (transformers' convention)
QLORA_AUTO_PARAMS = 3e9  # on CUDA, models over this many parameters load in 4-bit unless told otherwise
NF4_BYTES = 0.53  # bytes per 4-bit weight, with the double-quantized block scales
KINDS = {"lora": "LoRA", "dora": "DoRA", "full": "Full fine-tune"}
LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")


def _torch():
    require("torch", "cuda", "the torch training backend")
    import torch

    return torch


# ---- the machine --------------------------------------------------------------------------------
@dataclass
class Device:
    kind: str  # cuda | cpu
    index: int = 0
    name: str = "CPU"
    capability: tuple | None = None

    @property
    def torch(self):
        return f"cuda:{self.index}" if self.kind == "cuda" else "cpu"

    @property
    def bf16(self) -> bool:
        return self.kind == "cpu" or (self.capability or (0, 0)) >= (8, 0)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "index": self.index, "name": self.name,
                "capability": ".".join(map(str, self.capability)) if self.capability else None}


def pick_device(world) -> Device:
    torch = _torch()
    if torch.cuda.is_available():
        index = world.local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return Device("cuda", index, torch.cuda.get_device_name(index), tuple(torch.cuda.get_device_capability(index)))
    return Device("cpu")


class World:
    """The processes of a torchrun / accelerate launch (environment variables), or just this one."""

    def __init__(self):
        self.size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.dist = None
        self.device = "cpu"
        self.owned = False

    def init(self, device: Device) -> None:
        self.device = device.torch
        if self.size < 2:
            return
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.kind == "cuda" else "gloo")
            self.owned = True
        self.dist = dist

    def close(self) -> None:
        if self.owned and self.dist is not None and self.dist.is_initialized():
            self.dist.destroy_process_group()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over the processes (float64, so token counts stay exact)."""
        if self.size < 2:
            return list(values)
        torch = _torch()
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        self.dist.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        return self.sum([1.0 if flag else 0.0])[0] > 0 if self.size > 1 else flag

    def sum_grads(self, params) -> None:
        """Sum the (already weighted) gradients of every process, as one flat buffer."""
        if self.size < 2:
            return
        torch = _torch()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        self.dist.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(g).to(g.dtype)
            offset += n

    def same_start(self, params) -> None:
        """Every process starts from rank 0's trainable weights."""
        if self.size < 2:
            return
        for p in params:
            self.dist.broadcast(p.data, src=0)


# ---- precision and quantization ------------------------------------------------------------------
@dataclass
class Plan:
    dtype: str  # compute dtype: float32 | float16 | bfloat16
    load_in_4bit: bool
    scaler: bool  # fp16 needs loss scaling
    notes: list = field(default_factory=list)
    fused_loss: bool = False  # Unsloth: the model computes the loss from the labels with its fused kernel
    stored_4bit: bool = False  # the base's own files are 4-bit: no quantization config of ours

    @property
    def autocast(self) -> bool:
        return self.dtype != "float32"

    def weights_dtype(self, full: bool) -> str:
        """Frozen base weights in the compute dtype; a full fine-tune keeps float32 master weights."""
        return "float32" if full else self.dtype


def stored_quantization(cfg: dict) -> str | None:
    """'bnb-4bit' for a base stored in bitsandbytes 4-bit (e.g. unsloth/*-bnb-4bit), another name for other
    quantized bases, None for plain weights. MLX-quantized bases (mlx_lm.convert -q) cannot load in PyTorch."""
    q = cfg.get("quantization_config")
    if isinstance(q, dict):
        if q.get("quant_method", "bitsandbytes") == "bitsandbytes" and q.get("load_in_4bit"):
            return "bnb-4bit"
        return str(q.get("quant_method") or "unknown")
    if cfg.get("quantization"):
        raise BadInput("this base was quantized by MLX (mlx_lm.convert -q): PyTorch cannot load it",
                       hint="pass the original Hugging Face model; --load-in-4bit quantizes it on the fly on CUDA")
    return None


def plan_precision(opts: TrainOptions, device: Device, n_params: int, backend: str, stored: str | None = None) -> Plan:
    notes = []
    if stored and stored != "bnb-4bit":
        raise BadInput(f"the base is stored quantized ({stored}); medtune trains on 16-bit bases or bitsandbytes "
                       "4-bit ones", hint="pass the unquantized model (--load-in-4bit quantizes it on CUDA)")
    if stored and opts.load_in_4bit is False:
        raise BadInput("--no-load-in-4bit: this base is stored in 4-bit (bitsandbytes)",
                       hint="pass the 16-bit model, or drop --no-load-in-4bit")
    if device.kind == "cpu":
        if stored:
            raise BadInput("this base is stored in 4-bit (bitsandbytes), which needs a CUDA GPU",
                           hint="pass the 16-bit model to train on CPU")
        if opts.load_in_4bit:
            raise BadInput("QLoRA (--load-in-4bit) needs a CUDA GPU: bitsandbytes' 4-bit training kernels do not run "
                           "on this CPU", hint="drop --load-in-4bit (LoRA in float32 on CPU) or train on a CUDA machine; "
                                               "on a Mac, --backend mlx trains on an MLX-quantized base")
        if opts.precision == "fp16":
            raise BadInput("--precision fp16 is not supported on CPU (no fast float16 kernels, no loss scaling)",
                           hint="--precision auto (float32) or bf16")
        return Plan("bfloat16" if opts.precision == "bf16" else "float32", False, False, notes, backend == "unsloth")
    cap = ".".join(map(str, device.capability or ()))
    if opts.precision == "bf16" and not device.bf16:
        raise BadInput(f"{device.name} (compute capability {cap}) has no bfloat16; bf16 needs Ampere (8.0) or newer",
                       hint="--precision fp16 (or auto, which picks it with loss scaling)")
    if opts.precision == "auto":
        dtype = "bfloat16" if device.bf16 else "float16"
        if not device.bf16:
            notes.append(f"{device.name} (compute capability {cap}) has no bfloat16: training in float16 "
                         "with autocast and loss scaling (GradScaler)")
    else:
        dtype = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[opts.precision]
    four = True if stored else opts.load_in_4bit
    if stored:
        notes.append("the base is stored in 4-bit (bitsandbytes): QLoRA on it as it is")
    if four is None:
        four = n_params > QLORA_AUTO_PARAMS and opts.fine_tune_type != "full"
        if four:
            notes.append(f"the model has {n_params / 1e9:.1f}B parameters (over 3B): loading it in 4-bit (QLoRA, NF4); "
                         "--no-load-in-4bit to keep 16-bit weights")
    if four and opts.fine_tune_type == "full":
        raise BadInput("--load-in-4bit cannot be combined with --fine-tune-type full (4-bit weights are frozen)",
                       hint="use --fine-tune-type lora or dora for QLoRA, or --no-load-in-4bit")
    if backend == "torch":
        require("accelerate", "cuda", "loading models onto the GPU")
        if four:
            require("bitsandbytes", "cuda", "4-bit QLoRA")
    return Plan(dtype, bool(four), dtype == "float16", notes, backend == "unsloth", bool(stored))


# ---- model weights without loading them ----------------------------------------------------------
def weight_shapes(model_dir: Path) -> dict[str, tuple] | None:
    """{tensor name: shape} from the safetensors headers (the first few kB of each file): sizes and
    the layer structure of a model, before loading a byte of its weights. None if it has no safetensors."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted({model_dir / f for f in weight_map.values()})
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise BadInput(f"model.safetensors.index.json has no valid weight_map ({exc})", where=str(index),
                           hint="re-download the model") from exc
    else:
        files = sorted(p for p in model_dir.glob("*.safetensors") if not p.name.startswith("adapter"))
    if not files:
        return None
    shapes = {}
    from medtune.models.modelcheck import read_header

    for path in files:
        _, header = read_header(path)
        shapes.update({k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"})
    return shapes


def count_params(model_dir: Path, cfg: dict) -> int:
    shapes = weight_shapes(model_dir)
    if shapes:
        return sum(math.prod(s) for s in shapes.values())
    h, inter = int(cfg.get("hidden_size", 0)), int(cfg.get("intermediate_size", 0))
    layers, vocab = int(cfg.get("num_hidden_layers", 0)), int(cfg.get("vocab_size", 0))
    return vocab * h * (1 if cfg.get("tie_word_embeddings") else 2) + layers * (4 * h * h + 3 * h * inter)


def layer_linears(shapes: dict[str, tuple]) -> dict[int, dict[str, tuple]]:
    """{layer index: {module path inside the layer (self_attn.q_proj): weight shape}} for 2-D weights."""
    out: dict[int, dict[str, tuple]] = {}
    for name, shape in shapes.items():
        m = LAYER_RE.search(name)
        if m and len(shape) == 2 and m.group(2).endswith(".weight"):
            out.setdefault(int(m.group(1)), {})[m.group(2)[: -len(".weight")]] = shape
    return out


def resolve_targets(linear_paths: list[str], names: list[str] | None) -> list[str]:
    """--target-modules (short names or paths inside a layer) -> the leaf names PEFT and Unsloth match;
    None = every linear layer, as mlx_lm does."""
    if not names:
        return sorted({p.rsplit(".", 1)[-1] for p in linear_paths})
    leaves = []
    for name in names:
        hits = [p for p in linear_paths if p == name or p.endswith("." + name)]
        if not hits:
            raise BadInput(f"--target-modules: no linear layer named {name!r} in this model",
                           hint=f"available: {', '.join(sorted({p.rsplit('.', 1)[-1] for p in linear_paths}))}")
        leaves += [h.rsplit(".", 1)[-1] for h in hits]
    return sorted(set(leaves))


# ---- memory preflight ---------------------------------------------------------------------------
def available_memory(device: Device) -> tuple[int, str]:
    override = os.environ.get("MEDTUNE_MEMORY_LIMIT_GB")
    if override:
        return int(float(override) * 1e9), "MEDTUNE_MEMORY_LIMIT_GB"
    if device.kind == "cuda":
        free, _total = _torch().cuda.mem_get_info(device.index)
        return int(free), f"free memory on {device.name} (torch.cuda.mem_get_info)"
    from medtune.core.doctor import _memory

    avail = _memory().get("available_gb")
    return (int(avail * 1e9), "available system memory") if avail else (1 << 62, "unknown")


def estimate_memory(cfg: dict, weight_bytes: int, trainable: int, full: bool, batch: int, seq: int,
                    n_train_layers: int, grad_checkpoint: bool, act_bytes: int, attention_matrix: bool,
                    fused_loss: bool = False) -> dict:
    """Peak training memory (bytes): mlx_backend's model of it, in the dtypes this backend uses.

    weights as loaded + (float32 weights, grads and two Adam moments) of the trainable parameters
    + activations of the layers back-propagated through (the attention matrix only where SDPA
    materialises it: on CPU; CUDA kernels do not) + logits (value, float32 copy, gradient)."""
    hidden = int(cfg.get("hidden_size", 0))
    inter = int(cfg.get("intermediate_size", 4 * hidden))
    heads = int(cfg.get("num_attention_heads", 1))
    vocab = int(cfg.get("vocab_size", 0))
    tokens = batch * seq
    per_layer = tokens * (10 * hidden + 4 * inter) * act_bytes
    if attention_matrix:
        per_layer += 2 * batch * heads * seq * seq * act_bytes
    acts = per_layer * (1 if grad_checkpoint else n_train_layers)
    if grad_checkpoint:
        acts += tokens * hidden * act_bytes * n_train_layers
    logits = tokens * vocab * (act_bytes if fused_loss else act_bytes + 8)
    optimizer = trainable * (12 if full else 16)  # a full fine-tune's weights are in weight_bytes already
    return {"weights": weight_bytes, "optimizer": optimizer, "activations": acts, "logits": logits,
            "total": weight_bytes + optimizer + acts + logits}


@dataclass
class Sizes:
    total: int  # every parameter of the model being trained (adapters included)
    trainable: int
    weight_bytes: int


def sizes_from_headers(shapes: dict, opts: TrainOptions, plan: Plan, layer_ids: list[int], targets: list[str]) -> Sizes:
    """What the loaded model will hold, computed from the safetensors headers (no weights loaded)."""
    full = opts.fine_tune_type == "full"
    wbytes = {"float32": 4, "float16": 2, "bfloat16": 2}[plan.weights_dtype(full)]
    keep = set(layer_ids)
    base = weight_bytes = trainable = 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        base += n
        m = LAYER_RE.search(name)
        quantized = plan.load_in_4bit and m and len(shape) == 2 and name.endswith(".weight")
        weight_bytes += int(n * (NF4_BYTES if quantized else wbytes))
        if not m or int(m.group(1)) not in keep:
            continue
        if full:
            trainable += n
        elif len(shape) == 2 and name.endswith(".weight") and m.group(2)[: -len(".weight")].rsplit(".", 1)[-1] in targets:
            out_f, in_f = shape
            trainable += opts.rank * (in_f + out_f) + (out_f if opts.fine_tune_type == "dora" else 0)
    return Sizes(base if full else base + trainable, trainable, weight_bytes + (0 if full else trainable * 4))


def sizes_from_model(model) -> Sizes:
    total = trainable = nbytes = 0
    for p in model.parameters():
        n = p.numel() * (2 if type(p).__name__ == "Params4bit" else 1)  # two 4-bit values per stored byte
        total += n
        trainable += n if p.requires_grad else 0
        nbytes += p.numel() * p.element_size()
    return Sizes(total, trainable, nbytes)


def preflight(cfg: dict, opts: TrainOptions, sizes: Sizes, plan: Plan, device: Device, train_items, steps: int,
              n_train_layers: int, world_size: int, backend: str, loaded: bool = False) -> dict:
    """loaded: the model is in memory already (its weights count as available: they are in the estimate)."""
    longest = max(len(t) for t, _ in train_items)
    seq = PAD_MULTIPLE * math.ceil(longest / PAD_MULTIPLE)
    grad_checkpoint = opts.grad_checkpoint or backend == "unsloth"
    est = estimate_memory(cfg, sizes.weight_bytes, sizes.trainable, opts.fine_tune_type == "full",
                          max(1, opts.batch_size // world_size), seq, n_train_layers, grad_checkpoint,
                          4 if plan.dtype == "float32" else 2, device.kind == "cpu", fused_loss=backend == "unsloth")
    avail, source = available_memory(device)
    if loaded and source != "MEDTUNE_MEMORY_LIMIT_GB":
        avail += _torch().cuda.memory_allocated(device.index) if device.kind == "cuda" else sizes.weight_bytes
    return {"parameters": int(sizes.total), "trainable_parameters": int(sizes.trainable), "records": len(train_items),
            "tokens_per_epoch": int(sum(len(t) for t, _ in train_items)), "longest_record": int(longest),
            "steps": steps, "micro_batches": steps * opts.grad_accum,
            "epochs": round(steps * opts.grad_accum * opts.batch_size / max(len(train_items), 1), 2),
            "estimated_peak_bytes": int(est["total"]), "estimate": {k: int(v) for k, v in est.items()},
            "available_bytes": int(avail), "available_source": source,
            "backend": backend, "device": device.to_dict(), "precision": plan.dtype, "load_in_4bit": plan.load_in_4bit,
            "processes": world_size, "notes": list(plan.notes)}


def too_big(pf: dict, opts: TrainOptions, device: Device, plan: Plan) -> ResourceError | None:
    need, have = pf["estimated_peak_bytes"], pf["available_bytes"]
    if need <= 0.9 * have:
        return None
    tips = []
    if opts.batch_size > 1:
        tips.append(f"--batch-size 1 --grad-accum {opts.batch_size * opts.grad_accum}")
    if not opts.grad_checkpoint:
        tips.append("--grad-checkpoint")
    if device.kind == "cuda" and not plan.load_in_4bit and opts.fine_tune_type != "full":
        tips.append("--load-in-4bit")
    if opts.fine_tune_type == "full":
        tips.append("--fine-tune-type lora")
    if opts.num_layers < 0 or opts.num_layers > 4:
        tips.append("--num-layers 4")
    tips.append(f"--max-seq-length {max(256, pf['longest_record'] // 2)} (re-run prepare with it)")
    e = pf["estimate"]
    parts = ", ".join(f"{k} {e[k] / 1e9:.1f}" for k in ("weights", "optimizer", "activations", "logits"))
    err = ResourceError(f"training needs ~{need / 1e9:.1f} GB at its peak ({parts} GB; batch {opts.batch_size}, "
                        f"longest record {pf['longest_record']} tokens), {have / 1e9:.1f} GB is available "
                        f"({pf['available_source']})", hint="try " + ", ".join(tips))
    err.preflight = pf  # the figures, for a dry run to show before the refusal
    return err


# ---- model ----------------------------------------------------------------------------------------
def decoder_layers(model):
    """The ModuleList of transformer blocks (model.model.layers for Llama, Qwen, Mistral...)."""
    import torch.nn as nn

    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.endswith("layers") and (n is None or len(module) == n):
            return module
    raise BadInput("cannot find the transformer layers of this model", hint="medtune trains decoder-only causal LMs")


def _dtype_kw(dtype) -> dict:
    """transformers >= 4.56 calls it dtype (torch_dtype is deprecated there)."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": dtype}


def load_hf_model(path: Path, opts: TrainOptions, plan: Plan, device: Device):
    torch = _torch()
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, plan.weights_dtype(opts.fine_tune_type == "full"))
    kw = _dtype_kw(dtype)
    if plan.load_in_4bit and not plan.stored_4bit:
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_use_double_quant=True,
                                                       bnb_4bit_compute_dtype=getattr(torch, plan.dtype))
    if device.kind == "cuda":
        kw["device_map"] = {"": device.index}
    from medtune.core import safety
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kw, **safety.hf_load_kwargs(path))
    except (ValueError, OSError, KeyError) as exc:
        raise BadInput(f"transformers cannot load the model: {str(exc).splitlines()[0]}", where=str(path),
                       hint="check the model folder (config.json, safetensors, tokenizer)") from exc
    if device.kind == "cpu":
        model.to("cpu")
    model.config.use_cache = False
    if opts.grad_checkpoint:  # transformers 5 renamed it; the old name warns
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def attach_hf_adapters(model, opts: TrainOptions, layer_ids: list[int], n_total: int, targets: list[str]):
    """LoRA/DoRA through PEFT on the top layers, or unfreeze those layers for a full fine-tune."""
    torch = _torch()
    for p in model.parameters():
        p.requires_grad_(False)
    if opts.fine_tune_type == "full":
        layers = decoder_layers(model)
        for i in layer_ids:
            for p in layers[i].parameters():
                p.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=opts.rank, lora_alpha=opts.lora_scale * opts.rank, lora_dropout=opts.dropout,
                        target_modules=targets, layers_to_transform=None if len(layer_ids) == n_total else layer_ids,
                        use_dora=opts.fine_tune_type == "dora", bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(opts.seed)
    return get_peft_model(model, config)


def trainable_params(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]


# ---- data -----------------------------------------------------------------------------------------
def make_batch(items, group: list[int]):
    """(input ids, labels, tokens) for one micro-batch, padded to a multiple of 32 like the MLX backend.
    Labels are the tokens at positions offset..length-1 (position 0 never: nothing predicts it), exactly
    the targets mlx_backend.masked_loss counts; the rest is IGNORE. No attention mask: padding only comes
    after a sequence's last token, which causal attention never looks past."""
    torch = _torch()
    seqs = [items[i][0] for i in group]
    width = PAD_MULTIPLE * math.ceil(max(len(s) for s in seqs) / PAD_MULTIPLE)
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    for j, i in enumerate(group):
        toks, offset = items[i]
        ids[j, : len(toks)] = torch.tensor(toks, dtype=torch.long)
        start = max(offset, 1)
        labels[j, start: len(toks)] = ids[j, start: len(toks)]
    return ids, labels, sum(len(s) for s in seqs)


# ---- learning rate: the same schedule as the MLX backend -------------------------------------------
def lr_at(opts: TrainOptions, steps: int, i: int) -> float:
    """Learning rate of update i (0-based): mlx_backend.make_schedule's warm-up + constant/cosine/linear."""
    w = opts.warmup
    if w and i < w:
        start = opts.lr / (w + 1)  # never a zero-lr step
        return start + (opts.lr - start) * i / w
    s, decay = i - w, max(1, steps - w)
    if opts.lr_schedule == "cosine":
        return opts.lr * 0.5 * (1 + math.cos(math.pi * min(s, decay) / decay))
    if opts.lr_schedule == "linear":
        return opts.lr * (1 - min(s, decay) / decay)
    return opts.lr


# ---- adapters and checkpoints ---------------------------------------------------------------------
def _plain_json(obj):
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if hasattr(obj, "value"):
        return obj.value
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_adapter(dest: Path, model, opts: TrainOptions, base_path: Path, n_layers: int, backend: str) -> Path:
    """dest/adapter_model.safetensors + adapter_config.json: a PEFT adapter, or for a full fine-tune the
    trained tensors under the base model's own names (medtune_format torch-full). Files are renamed into
    place, weights first."""
    from safetensors.torch import save_file

    if opts.fine_tune_type == "full":
        weights = {n: p for n, p in model.named_parameters() if p.requires_grad}
        config = {"medtune_format": "torch-full", "fine_tune_type": "full", "num_layers": n_layers,
                  "base_model_name_or_path": str(base_path), "backend": backend, "medtune": opts.to_dict()}
    else:
        from peft import get_peft_model_state_dict

        weights = get_peft_model_state_dict(model)
        config = model.peft_config["default"].to_dict()
        config.update(base_model_name_or_path=str(base_path), inference_mode=True)
    weights = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
    with fsutil.atomic_path(dest / "adapter_model.safetensors") as tmp:
        save_file(weights, str(tmp), metadata={"format": "pt"})
    fsutil.write_text(dest / "adapter_config.json", json.dumps(config, indent=2, default=_plain_json) + "\n")
    return dest / "adapter_model.safetensors"


def load_adapter_weights(ckpt: Path, model, opts: TrainOptions) -> None:
    from safetensors.torch import load_file

    saved = load_file(str(ckpt / "adapter_model.safetensors"))
    if opts.fine_tune_type == "full":
        params = dict(model.named_parameters())
        missing = [k for k in saved if k not in params]
        if missing:
            raise BadInput(f"checkpoint does not fit this model ({missing[0]})", where=str(ckpt),
                           hint="resume with the same --model and --num-layers")
        with _torch().no_grad():
            for k, v in saved.items():
                params[k].copy_(v)
        return
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    expected = set(get_peft_model_state_dict(model))
    if set(saved) != expected:
        odd = sorted(set(saved) ^ expected)[0]
        raise BadInput(f"checkpoint does not fit this model and options ({odd})", where=str(ckpt),
                       hint="resume with the same --model, --fine-tune-type, --rank, --num-layers and --target-modules")
    set_peft_model_state_dict(model, saved)


def rng_states() -> dict:
    import random

    import numpy as np

    torch = _torch()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(),
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)]}


def set_rng_states(state: dict) -> None:
    import random

    import numpy as np

    torch = _torch()
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))


def save_checkpoint(out: Path, step: int, run: dict, adapter_writer, optimizer, scheduler, scaler, keep: int) -> Path:
    """checkpoints/step-NNNNNNN/: a loadable adapter (fuse takes it), optimizer + scheduler + loss scaler
    state, RNG states (torch, cuda, python, numpy) and state.json (step, data position, run totals)."""
    import shutil

    torch = _torch()
    target = out / "checkpoints" / f"step-{step:07d}"
    with fsutil.atomic_dir(target) as tmp:
        adapter_writer(tmp)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None}, tmp / "optimizer.pt")
        torch.save(rng_states(), tmp / "rng.pt")
        fsutil.write_json(tmp / "state.json", {**run, "step": step})
    for old in checkpoint_dirs(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint(ckpt: Path, model, opts: TrainOptions, optimizer, scheduler, scaler, device: Device) -> dict:
    torch = _torch()
    if not (ckpt / "optimizer.pt").is_file():
        raise BadInput("this checkpoint was not written by a PyTorch backend (no optimizer.pt)", where=str(ckpt),
                       hint="resume with the backend that wrote it (--backend mlx), or start without --resume")
    load_adapter_weights(ckpt, model, opts)
    state = torch.load(ckpt / "optimizer.pt", map_location=device.torch, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    if (ckpt / "rng.pt").is_file():
        set_rng_states(torch.load(ckpt / "rng.pt", weights_only=True))
    return json.loads((ckpt / "state.json").read_text())


# ---- evaluation ---------------------------------------------------------------------------------
def evaluate(model, items, batch_size: int, max_batches: int, world: World, plan: Plan, device: Device) -> float:
    """Mean loss over the label tokens of `items`; with several processes each takes its share of every
    batch and the sums are combined, so the result is one process's."""
    torch = _torch()
    groups = [list(range(i, min(i + batch_size, len(items)))) for i in range(0, len(items), batch_size)]
    if max_batches > 0:
        groups = groups[:max_batches]
    total = count = 0.0
    with torch.no_grad():
        for g in groups:
            mine = g[world.rank::world.size]
            if not mine:
                continue
            ids, labels, _ = make_batch(items, mine)
            loss, n = forward_loss(model, ids, labels, plan, device)
            total += float(loss) * n
            count += n
    total, count = world.sum([total, count])
    return total / max(count, 1)


def forward_loss(model, ids, labels, plan: Plan, device: Device):
    """(mean cross-entropy over the label tokens, number of label tokens).

    The input stops after the last position that predicts a label (causal attention never looks further),
    and logits are computed only from the first such position on (transformers' logits_to_keep): the
    vocabulary projection of the prompt, often the larger part, is never made. The loss is float32.
    With Unsloth, its fused kernel takes the labels (transformers' convention: shifted, IGNORE skipped)."""
    torch = _torch()
    ids, labels = ids.to(device.torch), labels.to(device.torch)
    n = int((labels[:, 1:] != IGNORE).sum())
    if n == 0:  # nothing to learn from in this share of the batch (a one-token text record)
        return torch.zeros((), device=ids.device, requires_grad=True), 0
    with torch.autocast(device.kind, dtype=getattr(torch, plan.dtype), enabled=plan.autocast):
        if plan.fused_loss:
            return model(input_ids=ids, labels=labels, use_cache=False).loss.float(), n
        cols = (labels[:, 1:] != IGNORE).any(0).nonzero().flatten()
        lo, hi = int(cols[0]), int(cols[-1]) + 1  # positions lo..hi-1 predict the labels lo+1..hi
        keep = _logits_to_keep(model)
        kw = {keep: hi - lo} if keep else {}
        logits = model(input_ids=ids[:, :hi], use_cache=False, **kw).logits[:, -(hi - lo):]
    targets = labels[:, lo + 1: hi + 1]
    ce = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                           ignore_index=IGNORE, reduction="sum")
    return ce / max(n, 1), n


def _logits_to_keep(model) -> str | None:
    """The name of the forward argument that limits the logits (None: the model computes them all)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cached = getattr(base, "_medtune_keep_arg", False)
    if cached is not False:
        return cached
    params = inspect.signature(base.forward).parameters
    found = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
    base._medtune_keep_arg = found
    return found


def peak_memory_gb(device: Device) -> float:
    if device.kind == "cuda":
        return _torch().cuda.max_memory_reserved(device.index) / 1e9
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1e9 if sys.platform == "darwin" else rss * 1024 / 1e9


# ---- the run ------------------------------------------------------------------------------------
def train(model_spec: str, data, out, opts: TrainOptions, progress=None, *, resume: bool = False,
          dry_run: bool = False, on_step=None, backend: str = "torch", loader=None) -> TrainResult:
    """LoRA/DoRA/QLoRA/full fine-tuning with PyTorch. `on_step(step, metrics)` is called after every
    optimizer step. `loader(path, opts, plan, device, layer_ids, n_layers, targets)` builds the trainable
    model (unsloth_backend passes Unsloth's); the default loads with transformers and attaches PEFT."""
    from medtune.models import pull
    from medtune.models.config import read_config

    opts.check()
    data, out = Path(data), Path(out)
    for name in ("train.jsonl", "valid.jsonl"):
        if not (data / name).is_file():
            raise BadInput(f"no {name} in {data}", hint="run `medtune prepare DATASET --out DIR` first and pass that DIR")
    if opts.test and not (data / "test.jsonl").is_file():
        raise BadInput(f"--test: no test.jsonl in {data}", hint="re-run prepare with --test-ratio 0.1")
    ckpts = checkpoint_dirs(out) if resume else []
    if resume and not ckpts:
        raise BadInput(f"--resume: no checkpoint in {out / 'checkpoints'}", hint="start without --resume")

    _torch()
    require("peft", "cuda", "LoRA on PyTorch")
    world = World()
    device = pick_device(world)
    model_ref = pull(model_spec)
    cfg = read_config(model_ref.path)
    plan = plan_precision(opts, device, count_params(model_ref.path, cfg), backend,  # refusals before any loading
                          stored_quantization(cfg))
    from transformers import AutoTokenizer

    from medtune.core import safety
    tokenizer = AutoTokenizer.from_pretrained(str(model_ref.path), trust_remote_code=safety.trust_remote_code())
    train_items = build_dataset(load_jsonl(data / "train.jsonl"), tokenizer, opts.mask_prompt, opts.max_seq_length,
                                data / "train.jsonl")
    val_items = build_dataset(load_jsonl(data / "valid.jsonl"), tokenizer, opts.mask_prompt, opts.max_seq_length,
                              data / "valid.jsonl")
    if len(train_items) < opts.batch_size:
        raise BadInput(f"{len(train_items)} training records, fewer than --batch-size {opts.batch_size}",
                       where=str(data / "train.jsonl"), hint="lower --batch-size or add data")
    rank, size = world.rank, world.size
    if opts.batch_size % size:
        raise BadInput(f"--batch-size {opts.batch_size} is not a multiple of the {size} processes",
                       hint=f"--batch-size is the global batch: use a multiple of {size}")
    steps = opts.steps_for(len(train_items))
    lead = rank == 0  # only the first process writes files and shows progress
    if not lead:
        progress = None

    n_total = int(cfg.get("num_hidden_layers", 0))
    shapes = weight_shapes(model_ref.path)
    linears = layer_linears(shapes) if shapes and not plan.stored_4bit else {}  # packed 4-bit shapes say little
    if n_total <= 0 and linears:
        n_total = max(linears) + 1
    n_layers = n_total if opts.num_layers < 0 else min(opts.num_layers, n_total)
    layer_ids = list(range(n_total - n_layers, n_total))
    world.init(device)
    try:
        # Preflight from the safetensors headers: sizes and memory before a byte of the weights is loaded,
        # so a model that cannot fit is refused in seconds, not after minutes of loading (and dry runs are free).
        pf = None
        if linears:
            targets = resolve_targets(sorted(linears[min(linears)]), opts.target_modules)
            sizes = sizes_from_headers(shapes, opts, plan, layer_ids, targets)
            pf = preflight(cfg, opts, sizes, plan, device, train_items, steps, n_layers, size, backend)
            _agree_fits(world, too_big(pf, opts, device, plan))  # a dry run gives the same verdict
            if dry_run:
                return _dry(out, steps, pf, backend)
        shown = len(plan.notes)
        for note in plan.notes:
            if progress:
                log_line(progress, note)
        model = (loader or load_with_peft)(model_ref.path, opts, plan, device, layer_ids, n_total,
                                           opts.target_modules)
        for note in plan.notes[shown:]:
            if progress:
                log_line(progress, note)
        params = trainable_params(model)
        world.same_start(params)
        pf_model = preflight(cfg, opts, sizes_from_model(model), plan, device, train_items, steps, n_layers, size,
                             backend, loaded=True)
        if pf is None:
            pf = pf_model
            _agree_fits(world, too_big(pf, opts, device, plan))
            if dry_run:
                return _dry(out, steps, pf, backend)
        pf.update(parameters=pf_model["parameters"], trainable_parameters=pf_model["trainable_parameters"],
                  notes=list(plan.notes))
        return _run(model, params, tokenizer, train_items, val_items, data, out, opts, plan, device, world, pf,
                    steps, n_layers, model_ref, ckpts, progress, on_step, backend, lead)
    finally:
        world.close()


def load_with_peft(path, opts, plan, device, layer_ids, n_total, target_names):
    model = load_hf_model(path, opts, plan, device)
    import torch.nn as nn

    layer = decoder_layers(model)[0]
    linear = [n for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
    targets = resolve_targets(linear, target_names)
    return attach_hf_adapters(model, opts, layer_ids, n_total, targets)


def _dry(out: Path, steps: int, pf: dict, backend: str) -> TrainResult:
    return TrainResult(out=out, adapter_file=out / "adapter_model.safetensors", steps=steps, final_train_loss=None,
                       final_val_loss=None, first_val_loss=None, tokens_per_second=0.0, seconds=0.0,
                       trainable_parameters=pf["trainable_parameters"], total_parameters=pf["parameters"],
                       preflight=pf, backend=backend)


def _agree_fits(world: World, refusal: ResourceError | None) -> None:
    """Every process refuses together (their GPUs may differ), or none does: no process is left waiting."""
    if world.any(refusal is not None):
        raise refusal or ResourceError("another process of this run cannot fit the training in its memory",
                                       hint="see the first process's message")


def _run(model, params, tokenizer, train_items, val_items, data: Path, out: Path, opts: TrainOptions, plan: Plan,
         device: Device, world: World, pf: dict, steps: int, n_layers: int, model_ref, ckpts, progress, on_step,
         backend: str, lead: bool) -> TrainResult:
    torch = _torch()
    rank, size = world.rank, world.size
    if lead:
        out.mkdir(parents=True, exist_ok=True)
    optimizer = torch.optim.Adam(params, lr=opts.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_at(opts, steps, i) / opts.lr)
    scaler = torch.amp.GradScaler(device.kind) if plan.scaler else None

    def writer(dest: Path) -> Path:
        return write_adapter(dest, model, opts, model_ref.path, n_layers, backend)

    # Where the run stands; a checkpoint holds exactly this, plus the weights, optimizer and RNG states.
    run = {"epoch": 0, "pos": 0, "micro": 0, "tokens_seen": 0, "t_train": 0.0, "first_val": None,
           "val_loss": None, "train_loss": None}
    start = 0
    resumed_from = None
    if ckpts:
        saved = load_checkpoint(ckpts[-1], model, opts, optimizer, scheduler, scaler, device)
        start = resumed_from = int(saved.pop("step"))
        saved.pop("backend", None)
        run.update(saved)

    metrics = MetricsLog(out / "metrics.jsonl", truncate=not ckpts, enabled=lead)
    if ckpts:
        metrics.keep_until(start)
    order = batch_order(train_items, opts.batch_size, opts.seed, run["epoch"])
    t0 = time.perf_counter()
    if device.kind == "cuda":
        torch.cuda.reset_peak_memory_stats(device.index)
    task = progress.add_task("training", total=steps, completed=start, loss="-", val="-", tps="-", mem="-") \
        if progress else None

    def next_batch():
        nonlocal order
        # Randomness (dropout) is reseeded from the run's position before every micro-batch, as in the MLX
        # backend: a resumed run draws exactly the same numbers.
        torch.manual_seed((opts.seed * 1_000_003 + run["micro"]) * size + rank)
        run["micro"] += 1
        if run["pos"] >= len(order):
            run["epoch"], run["pos"] = run["epoch"] + 1, 0
            order = batch_order(train_items, opts.batch_size, opts.seed, run["epoch"])
        group = order[run["pos"]][rank::size]
        run["pos"] += 1
        return make_batch(train_items, group)

    def run_eval(it: int):
        model.eval()
        loss = evaluate(model, val_items, opts.batch_size, opts.val_batches, world, plan, device)
        model.train()
        run["val_loss"] = loss
        run["first_val"] = loss if run["first_val"] is None else run["first_val"]
        metrics.write({"step": it, "val_loss": loss, "val_ppl": math.exp(min(loss, 50))})
        if progress:
            progress.update(task, val=f"{loss:.3f}")
            log_validation(progress, it, steps, run, loss)

    def checkpoint(it: int) -> Path:
        target = out / "checkpoints" / f"step-{it:07d}"
        if lead:
            save_checkpoint(out, it, {**run, "backend": backend}, writer, optimizer, scheduler, scaler,
                            opts.keep_checkpoints)
        return target

    stop = StopOnSignal(progress).install()

    if start == 0:
        run_eval(0)
    model.train()
    try:
        for it in range(start + 1, steps + 1):
            tic = time.perf_counter()
            losses, n_tok, n_lab = 0.0, 0, 0
            for _ in range(opts.grad_accum):
                ids, labels, tokens = next_batch()
                mine = int((labels[:, 1:] != IGNORE).sum())
                all_lab, all_tok = world.sum([mine, tokens])
                weight = mine / all_lab  # this process's share of the batch's label tokens
                loss, _ = forward_loss(model, ids, labels, plan, device)
                scaled = loss * (weight / opts.grad_accum)
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
                losses += world.sum([float(loss.detach()) * weight])[0]
                n_tok += int(all_tok)
                n_lab += int(all_lab)
            world.sum_grads(params)
            lr = optimizer.param_groups[0]["lr"]
            overflow = False
            if scaler is not None:
                before = scaler.get_scale()
                scaler.step(optimizer)
                scaler.update()
                overflow = scaler.get_scale() < before  # inf/nan gradients: the update was skipped
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            loss_v = losses / opts.grad_accum
            dt = time.perf_counter() - tic
            run["t_train"] += dt
            run["tokens_seen"] += n_tok
            run["train_loss"] = loss_v
            peak = peak_memory_gb(device)
            row = {"step": it, "epoch": run["epoch"], "train_loss": loss_v, "label_tokens": n_lab,
                   "tokens_per_second": run["tokens_seen"] / run["t_train"], "step_seconds": dt,
                   "learning_rate": lr, "peak_memory_gb": peak}
            if overflow:
                row["skipped_overflow"] = True
            metrics.write(row)
            if progress:
                progress.update(task, advance=1, loss=f"{loss_v:.3f}", tps=f"{row['tokens_per_second']:.0f}",
                                mem=f"{peak:.2f}")
            if it % opts.steps_per_eval == 0 or it == steps:
                run_eval(it)
            if it % opts.save_every == 0 and it != steps:
                checkpoint(it)
            if on_step:
                on_step(it, row)
            if world.any(stop.asked) and it != steps:
                path = checkpoint(it)
                raise Interrupted(f"stopped at step {it}/{steps}; checkpoint {path}",
                                  hint=f"run the same command again to continue from this checkpoint (output folder {out})")
    finally:
        stop.restore()

    adapter_file = out / "adapter_model.safetensors"
    if lead:
        writer(out)
    test_loss = None
    if opts.test:
        test_items = build_dataset(load_jsonl(data / "test.jsonl"), tokenizer, opts.mask_prompt, opts.max_seq_length,
                                   data / "test.jsonl")
        model.eval()
        test_loss = evaluate(model, test_items, opts.batch_size, -1, world, plan, device)
        metrics.write({"step": steps, "test_loss": test_loss, "test_ppl": math.exp(min(test_loss, 50))})
    peak = peak_memory_gb(device)
    plot = plot_losses(metrics.rows, out / "loss.png", title=f"{KINDS[opts.fine_tune_type]} on {model_ref.spec} "
                                                            f"({backend}, {device.name})") if lead else None
    result = TrainResult(out=out, adapter_file=adapter_file, steps=steps, final_train_loss=run["train_loss"],
                         final_val_loss=run["val_loss"], first_val_loss=run["first_val"],
                         tokens_per_second=run["tokens_seen"] / max(run["t_train"], 1e-9),
                         seconds=time.perf_counter() - t0, trainable_parameters=pf["trainable_parameters"],
                         total_parameters=pf["parameters"], resumed_from=resumed_from, test_loss=test_loss,
                         preflight=pf, backend=backend, peak_memory_gb=round(peak, 3),
                         files={"adapters": str(adapter_file), "adapter_config": str(out / "adapter_config.json"),
                                "metrics": str(metrics.path), "loss_plot": str(plot) if plot else None})
    if not lead:
        return result
    data_manifest = data / "manifest.json"
    redact.write_json(out / "manifest.json", {
        "stage": "train", "backend": backend, "processes": size, "device": device.to_dict(),
        "precision": plan.dtype, "load_in_4bit": plan.load_in_4bit, "loss_scaling": plan.scaler,
        "peak_memory_gb": round(peak, 3), "tokens_per_second": result.tokens_per_second,
        "inputs": {"model": model_ref.to_dict(), "data": str(data),
                   "data_manifest_sha256": fsutil.sha256_file(data_manifest) if data_manifest.exists() else None,
                   "train_sha256": fsutil.sha256_file(data / "train.jsonl"),
                   "valid_sha256": fsutil.sha256_file(data / "valid.jsonl")},
        "options": opts.to_dict(), "result": result.to_dict(), "versions": versions(),
        "outputs": {"adapter_model.safetensors": fsutil.sha256_file(adapter_file)},
    })
    return result


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    from medtune.data.prepare import versions as base

    found = base()
    for pkg in ("torch", "peft", "accelerate", "bitsandbytes", "unsloth"):
        try:
            found[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return found

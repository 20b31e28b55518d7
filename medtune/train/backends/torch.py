"""LoRA/DoRA/QLoRA/full fine-tuning on PyTorch: transformers + PEFT, on a CUDA GPU or a CPU.

The MLX backend's job on the same terms, in medtune.train.loop: the prepared records go through
medtune.data.encode (the rendering prepare checked), the loss covers exactly the same tokens, batches come
in the same seeded order, and the run writes the same metrics.jsonl, loss.png, checkpoints and manifest.
The adapter is a PEFT folder (adapter_config.json + adapter_model.safetensors) that `medtune fuse` merges.
A checkpoint also holds the scheduler, loss scaler and RNG states: resume is bit-exact.

On CUDA: bf16 on Ampere and newer; before (T4, V100) fp16 autocast with a GradScaler, since those GPUs
have no bf16. Models over 3B parameters load in 4-bit (QLoRA, bitsandbytes NF4) unless told otherwise.
Launched by torchrun / accelerate launch, it trains data-parallel: --batch-size is the global batch,
each process takes its share of every batch, and gradients are combined weighted by label tokens, so N
processes compute what one process would on the whole batch. Only rank 0 writes.

backends.unsloth subclasses TorchBackend with Unsloth's model loading.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from medtune.core import fsutil
from medtune.core.errors import BadInput, require
from medtune.train import loss as losses
from medtune.train import preflight as pre
from medtune.train.backends.base import Backend, Step
from medtune.train.data import eval_groups, padded
from medtune.train.hf import (
    LAYER_RE,
    count_params,
    dtype_kwargs,
    layer_linears,
    weight_shapes,
)
from medtune.train.options import TrainOptions
from medtune.train.report import log_line
from medtune.train.targets import match_targets

IGNORE = -100  # label of a position that gets no loss (transformers' convention)
QLORA_AUTO_PARAMS = 3e9  # on CUDA, models over this many parameters load in 4-bit unless told otherwise
NF4_BYTES = 0.53  # bytes per 4-bit weight, with the double-quantized block scales


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
        return {
            "kind": self.kind,
            "index": self.index,
            "name": self.name,
            "capability": ".".join(map(str, self.capability)) if self.capability else None,
        }


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
            p.grad = flat[offset : offset + n].view_as(g).to(g.dtype)
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
        raise BadInput(
            "this base was quantized by MLX (mlx_lm.convert -q): PyTorch cannot load it",
            hint="pass the original Hugging Face model; --load-in-4bit quantizes it on the fly on CUDA",
        )
    return None


def plan_precision(opts: TrainOptions, device: Device, n_params: int, backend: str, stored: str | None = None) -> Plan:
    notes = []
    if stored and stored != "bnb-4bit":
        raise BadInput(
            f"the base is stored quantized ({stored}); medtune trains on 16-bit bases or bitsandbytes 4-bit ones",
            hint="pass the unquantized model (--load-in-4bit quantizes it on CUDA)",
        )
    if stored and opts.load_in_4bit is False:
        raise BadInput(
            "--no-load-in-4bit: this base is stored in 4-bit (bitsandbytes)",
            hint="pass the 16-bit model, or drop --no-load-in-4bit",
        )
    if device.kind == "cpu":
        if stored:
            raise BadInput(
                "this base is stored in 4-bit (bitsandbytes), which needs a CUDA GPU",
                hint="pass the 16-bit model to train on CPU",
            )
        if opts.load_in_4bit:
            raise BadInput(
                "QLoRA (--load-in-4bit) needs a CUDA GPU: bitsandbytes' 4-bit training kernels do not run on this CPU",
                hint="drop --load-in-4bit (LoRA in float32 on CPU) or train on a CUDA machine; "
                "on a Mac, --backend mlx trains on an MLX-quantized base",
            )
        if opts.precision == "fp16":
            raise BadInput(
                "--precision fp16 is not supported on CPU (no fast float16 kernels, no loss scaling)",
                hint="--precision auto (float32) or bf16",
            )
        return Plan("bfloat16" if opts.precision == "bf16" else "float32", False, False, notes, backend == "unsloth")
    cap = ".".join(map(str, device.capability or ()))
    if opts.precision == "bf16" and not device.bf16:
        raise BadInput(
            f"{device.name} (compute capability {cap}) has no bfloat16; bf16 needs Ampere (8.0) or newer",
            hint="--precision fp16 (or auto, which picks it with loss scaling)",
        )
    if opts.precision == "auto":
        dtype = "bfloat16" if device.bf16 else "float16"
        if not device.bf16:
            notes.append(
                f"{device.name} (compute capability {cap}) has no bfloat16: training in float16 "
                "with autocast and loss scaling (GradScaler)"
            )
    else:
        dtype = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[opts.precision]
    four = True if stored else opts.load_in_4bit
    if stored:
        notes.append("the base is stored in 4-bit (bitsandbytes): QLoRA on it as it is")
    if four is None:
        four = n_params > QLORA_AUTO_PARAMS and opts.fine_tune_type != "full"
        if four:
            notes.append(
                f"the model has {n_params / 1e9:.1f}B parameters (over 3B): loading it in 4-bit (QLoRA, NF4); "
                "--no-load-in-4bit to keep 16-bit weights"
            )
    if four and opts.fine_tune_type == "full":
        raise BadInput(
            "--load-in-4bit cannot be combined with --fine-tune-type full (4-bit weights are frozen)",
            hint="use --fine-tune-type lora or dora for QLoRA, or --no-load-in-4bit",
        )
    if backend == "torch":
        require("accelerate", "cuda", "loading models onto the GPU")
        if four:
            require("bitsandbytes", "cuda", "4-bit QLoRA")
    return Plan(dtype, bool(four), dtype == "float16", notes, backend == "unsloth", bool(stored))


def resolve_targets(linear_paths: list[str], names: list[str] | None) -> list[str]:
    """--target-modules (short names or paths inside a layer) -> the leaf names PEFT and Unsloth match;
    None = every linear layer, as mlx_lm does."""
    if not names:
        return sorted({p.rsplit(".", 1)[-1] for p in linear_paths})
    return sorted({p.rsplit(".", 1)[-1] for p in match_targets(linear_paths, names)})


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
        elif (
            len(shape) == 2 and name.endswith(".weight") and m.group(2)[: -len(".weight")].rsplit(".", 1)[-1] in targets
        ):
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


class TorchBackend(Backend):
    name = "torch"
    adapter_kind = "peft"
    adapter_file = "adapter_model.safetensors"
    packages = ("torch", "peft", "accelerate", "bitsandbytes", "unsloth")
    uses = ("torch", "peft")
    always_checkpoints = False  # activations are recomputed whatever --grad-checkpoint says (Unsloth)

    def check_available(self) -> None:
        _torch()
        require("peft", "cuda", "LoRA on PyTorch")

    # ---- loading -------------------------------------------------------------------------------------
    def open(self, model_ref, cfg: dict):
        """The device, the precision plan (its refusals come before any loading), the layers to train."""
        from transformers import AutoTokenizer

        from medtune.core import safety

        opts = self.opts
        self.world = World()
        self.device = pick_device(self.world)
        self.model_ref, self.cfg = model_ref, cfg
        self.plan = plan_precision(
            opts, self.device, count_params(model_ref.path, cfg), self.name, stored_quantization(cfg)
        )
        tokenizer = AutoTokenizer.from_pretrained(str(model_ref.path), trust_remote_code=safety.trust_remote_code())
        self.rank, self.size = self.world.rank, self.world.size
        self.n_total = int(cfg.get("num_hidden_layers", 0))
        self.shapes = weight_shapes(model_ref.path)
        # packed 4-bit shapes say little
        self.linears = layer_linears(self.shapes) if self.shapes and not self.plan.stored_4bit else {}
        if self.n_total <= 0 and self.linears:
            self.n_total = max(self.linears) + 1
        self.n_layers = self.n_total if opts.num_layers < 0 else min(opts.num_layers, self.n_total)
        self.layer_ids = list(range(self.n_total - self.n_layers, self.n_total))
        self.world.init(self.device)
        return tokenizer

    def preflight(self, train_items, steps: int, loaded: bool) -> dict | None:
        """Before loading: from the safetensors headers (None without them); loaded: from the model itself,
        whose weights then count as available (they are in the estimate)."""
        if loaded:
            sizes = sizes_from_model(self.model)
        elif self.linears:
            targets = resolve_targets(sorted(self.linears[min(self.linears)]), self.opts.target_modules)
            sizes = sizes_from_headers(self.shapes, self.opts, self.plan, self.layer_ids, targets)
        else:
            return None
        opts, plan, device = self.opts, self.plan, self.device
        _, seq = pre.longest_batch(train_items)  # a pair's longer side: a batch of pairs is as wide
        rows = max(1, opts.batch_size // self.size) * (1 if opts.method == "sft" else 2)  # and holds both sides
        est = pre.estimate_memory(
            self.cfg,
            sizes.weight_bytes,
            sizes.trainable,
            rows,
            seq,
            self.n_layers,
            opts.grad_checkpoint or self.always_checkpoints,
            act_bytes=4 if plan.dtype == "float32" else 2,
            attention_matrices=2 if device.kind == "cpu" else 0,  # CUDA kernels do not materialise them
            loss=self.loss_kind(loaded),
            optimizer_bytes=12 if opts.fine_tune_type == "full" else 16,
        )
        avail, source = available_memory(device)
        if loaded and source != "MEDTUNE_MEMORY_LIMIT_GB":
            avail += _torch().cuda.memory_allocated(device.index) if device.kind == "cuda" else sizes.weight_bytes
        pf = pre.figures(sizes.total, sizes.trainable, opts, train_items, steps, est, (avail, source))
        pf.update(
            backend=self.name,
            device=device.to_dict(),
            precision=plan.dtype,
            load_in_4bit=plan.load_in_4bit,
            processes=self.size,
            notes=list(plan.notes),
        )
        return pf

    def loss_kind(self, loaded: bool) -> str:
        """How the loss is computed (preflight.estimate_memory's `loss`): before loading, the chunked loss is
        expected (medtune.train.loss checks the split once the model is loaded)."""
        if self.plan.fused_loss:
            return "fused"
        return "chunked" if not loaded or self.split is not None else "plain"

    def memory_tips(self) -> list[str]:
        tips = []
        full = self.opts.fine_tune_type == "full"
        if self.device.kind == "cuda" and not self.plan.load_in_4bit and not full:
            tips.append("--load-in-4bit")
        if full:
            tips.append("--fine-tune-type lora")
        return tips

    def build(self, progress=None) -> None:
        shown = len(self.plan.notes)
        for note in self.plan.notes:
            if progress:
                log_line(progress, note)
        self.model = self.load_model()
        self.split = None if self.plan.fused_loss else losses.torch_split(self.model)
        for note in self.plan.notes[shown:]:
            if progress:
                log_line(progress, note)
        self.params = trainable_params(self.model)
        self.world.same_start(self.params)

    def load_model(self):
        """The trainable model: transformers' model with PEFT's adapter layers (Unsloth overrides this)."""
        import torch.nn as nn

        model = load_hf_model(self.model_ref.path, self.opts, self.plan, self.device)
        if self.opts.adapter is not None:
            return start_from_adapter(model, Path(self.opts.adapter), self.model_ref.path)
        layer = decoder_layers(model)[0]
        linear = [n for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
        targets = resolve_targets(linear, self.opts.target_modules)
        return attach_hf_adapters(model, self.opts, self.layer_ids, self.n_total, targets)

    # ---- training ------------------------------------------------------------------------------------
    def any(self, flag: bool) -> bool:
        return self.world.any(flag)

    def make_optimizer(self, steps: int) -> None:
        torch, opts = _torch(), self.opts
        self.optimizer = torch.optim.Adam(self.params, lr=opts.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda i: lr_at(opts, steps, i) / opts.lr)
        self.scaler = torch.amp.GradScaler(self.device.kind) if self.plan.scaler else None

    def load_checkpoint(self, ckpt: Path) -> None:
        torch = _torch()
        if not (ckpt / "optimizer.pt").is_file():
            raise BadInput(
                "this checkpoint was not written by a PyTorch backend (no optimizer.pt)",
                where=str(ckpt),
                hint="resume with the backend that wrote it (--backend mlx), or start without --resume",
            )
        load_adapter_weights(ckpt, self.model, self.opts)
        state = torch.load(ckpt / "optimizer.pt", map_location=self.device.torch, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if (ckpt / "rng.pt").is_file():
            set_rng_states(torch.load(ckpt / "rng.pt", weights_only=True))

    def start(self) -> None:
        if self.device.kind == "cuda":
            _torch().cuda.reset_peak_memory_stats(self.device.index)
        self.model.train()

    def reseed(self, seed: int) -> None:
        _torch().manual_seed(seed)

    def step(self, items, draw) -> Step:
        """grad_accum micro-batches, each process's loss weighted by its share of the label tokens, the
        gradients summed over the processes, one (possibly loss-scaled) update."""
        if self.opts.method != "sft":
            return self._pairs_step(items, draw)
        world, opts, scaler = self.world, self.opts, self.scaler
        losses, n_tok, n_lab = 0.0, 0, 0
        for _ in range(opts.grad_accum):
            ids, labels, tokens = make_batch(items, draw())
            mine = int((labels[:, 1:] != IGNORE).sum())
            all_lab, all_tok = world.sum([mine, tokens])
            weight = mine / all_lab  # this process's share of the batch's label tokens
            loss, _ = forward_loss(self.model, ids, labels, self.plan, self.device, self.split)
            scaled = loss * (weight / opts.grad_accum)
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
            losses += world.sum([float(loss.detach()) * weight])[0]
            n_tok += int(all_tok)
            n_lab += int(all_lab)
        world.sum_grads(self.params)
        lr = self.optimizer.param_groups[0]["lr"]
        overflow = self._update()
        return Step(losses / opts.grad_accum, n_tok, n_lab, lr, overflow)

    # ---- preference pairs (--method dpo|orpo) ------------------------------------------------------------
    def _one_process(self) -> None:
        if self.size > 1:
            raise BadInput(
                f"--method {self.opts.method} trains in one process for now", hint="run without torchrun / accelerate"
            )

    def _autocast(self):
        torch = _torch()
        return torch.autocast(self.device.kind, dtype=getattr(torch, self.plan.dtype), enabled=self.plan.autocast)

    def _preference_loss(self, batch):
        """(loss, metrics) of a batch of pairs (medtune.train.preference.PairBatch) in the run's precision."""
        from medtune.train.preference import torch_batch, torch_preference_loss

        weight = self.opts.beta if self.opts.method == "dpo" else self.opts.orpo_lambda
        with self._autocast():
            loss, metrics = torch_preference_loss(
                self.model, torch_batch(batch, self.device.torch), self.opts.method, weight, self.split
            )
        return loss.float(), metrics

    def _pairs_step(self, items, draw) -> Step:
        """One (possibly loss-scaled) update on a batch of preference pairs: the loss, its metrics (reward
        margin, accuracy, …)."""
        from medtune.train.preference import pair_batch

        self._one_process()
        pb = pair_batch(items, draw(), items.ref)
        loss, metrics = self._preference_loss(pb)
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        lr = self.optimizer.param_groups[0]["lr"]
        overflow = self._update()
        extra = {k: float(v) for k, v in metrics.items()}
        return Step(float(loss.detach()), pb.tokens, int(pb.segments.sum()), lr, overflow, extra=extra)

    def reference_logps(self, pairs) -> tuple:
        from medtune.train.preference import torch_reference_logps

        self._one_process()
        with self._autocast():
            return torch_reference_logps(
                self.model, pairs, self.opts.batch_size, split=self.split, adapter_off=False, device=self.device.torch
            )

    def _eval_pairs(self, pairs, max_batches: int) -> tuple[float, dict]:
        """The preference loss and its metrics over the validation pairs, each batch weighted by its pairs."""
        from medtune.train.preference import pair_batch

        total, sums = 0.0, {}
        groups = eval_groups(len(pairs), self.opts.batch_size, max_batches)
        with _torch().no_grad():
            for group in groups:
                loss, metrics = self._preference_loss(pair_batch(pairs, group, pairs.ref))
                total += float(loss) * len(group)
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v) * len(group)
        n = sum(len(g) for g in groups)
        return total / n, {k: v / n for k, v in sums.items()}

    def _update(self) -> bool:
        """The optimizer and scheduler step; True when loss scaling found inf/nan gradients and skipped it."""
        overflow = False
        if self.scaler is not None:
            before = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            overflow = self.scaler.get_scale() < before
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return overflow

    def eval_loss(self, items, max_batches: int = -1) -> float:
        self.model.eval()
        if self.opts.method != "sft":
            loss, self.eval_metrics = self._eval_pairs(items, max_batches)
        else:
            loss = evaluate(
                self.model, items, self.opts.batch_size, max_batches, self.world, self.plan, self.device, self.split
            )
        self.model.train()
        return loss

    def peak_memory_gb(self) -> float:
        return peak_memory_gb(self.device)

    # ---- outputs -------------------------------------------------------------------------------------
    def checkpoint_state(self) -> dict:
        return {"backend": self.name}

    def save_checkpoint(self, folder: Path) -> None:
        """A loadable adapter (fuse takes it), optimizer + scheduler + loss scaler state and the RNG states
        (torch, cuda, python, numpy)."""
        torch = _torch()
        self.save_adapter(folder)
        torch.save(
            {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            },
            folder / "optimizer.pt",
        )
        torch.save(rng_states(), folder / "rng.pt")

    def save_adapter(self, folder: Path) -> None:
        write_adapter(folder, self.model, self.opts, self.model_ref.path, self.n_layers, self.name)

    def final_peak_memory_gb(self) -> float:
        return round(peak_memory_gb(self.device), 3)

    def title_suffix(self) -> str:
        return f" ({self.name}, {self.device.name})"

    def manifest_fields(self, result) -> dict:
        return {
            "device": self.device.to_dict(),
            "precision": self.plan.dtype,
            "load_in_4bit": self.plan.load_in_4bit,
            "loss_scaling": self.plan.scaler,
            "peak_memory_gb": result.peak_memory_gb,
            "tokens_per_second": result.tokens_per_second,
        }

    def close(self) -> None:
        self.world.close()


# ---- model ----------------------------------------------------------------------------------------
def decoder_layers(model):
    """The ModuleList of transformer blocks (model.model.layers for Llama, Qwen, Mistral...)."""
    import torch.nn as nn

    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.endswith("layers") and (n is None or len(module) == n):
            return module
    raise BadInput("cannot find the transformer layers of this model", hint="medtune trains decoder-only causal LMs")


def load_hf_model(path: Path, opts: TrainOptions, plan: Plan, device: Device):
    torch = _torch()
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, plan.weights_dtype(opts.fine_tune_type == "full"))
    kw = dtype_kwargs(dtype)
    if plan.load_in_4bit and not plan.stored_4bit:
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=getattr(torch, plan.dtype),
        )
    if device.kind == "cuda":
        kw["device_map"] = {"": device.index}
    from medtune.core import safety

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kw, **safety.hf_load_kwargs(path))
    except (ValueError, OSError, KeyError) as exc:
        raise BadInput(
            f"transformers cannot load the model: {str(exc).splitlines()[0]}",
            where=str(path),
            hint="check the model folder (config.json, safetensors, tokenizer)",
        ) from exc
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

    config = LoraConfig(
        r=opts.rank,
        lora_alpha=opts.lora_scale * opts.rank,
        lora_dropout=opts.dropout,
        target_modules=targets,
        layers_to_transform=None if len(layer_ids) == n_total else layer_ids,
        use_dora=opts.fine_tune_type == "dora",
        bias="none",
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(opts.seed)
    return get_peft_model(model, config)


def start_from_adapter(model, folder: Path, base: Path):
    """--init-adapter: PEFT's layers and weights from the adapter (an mlx_lm one converted first, exactly), trainable."""
    from peft import PeftModel

    from medtune.adapters import as_peft

    for p in model.parameters():
        p.requires_grad_(False)
    try:
        return PeftModel.from_pretrained(model, str(as_peft(folder, base)), is_trainable=True)
    except (ValueError, RuntimeError, KeyError) as exc:
        raise BadInput(
            f"--init-adapter {folder} does not fit this model: {str(exc).splitlines()[0]}",
            where=str(folder),
            hint="the adapter's base_model: start from an adapter trained on this --model",
        ) from exc


def trainable_params(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]


# ---- data -----------------------------------------------------------------------------------------
def make_batch(items, group: list[int]):
    """(input ids, labels, tokens) for one micro-batch, padded to a multiple of 32 like the MLX backend.
    Labels are the tokens at positions offset..length-1 (position 0 never: nothing predicts it), exactly
    the targets backends.mlx.masked_loss counts; the rest is IGNORE. No attention mask: padding only comes
    after a sequence's last token, which causal attention never looks past."""
    torch = _torch()
    seqs = [items[i][0] for i in group]
    width = padded(max(len(s) for s in seqs))
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    for j, i in enumerate(group):
        toks, offset = items[i]
        ids[j, : len(toks)] = torch.tensor(toks, dtype=torch.long)
        start = max(offset, 1)
        labels[j, start : len(toks)] = ids[j, start : len(toks)]
    return ids, labels, sum(len(s) for s in seqs)


# ---- learning rate: the same schedule as the MLX backend -------------------------------------------
def lr_at(opts: TrainOptions, steps: int, i: int) -> float:
    """Learning rate of update i (0-based): backends.mlx.make_schedule's warm-up + constant/cosine/linear."""
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
        config = {
            "medtune_format": "torch-full",
            "fine_tune_type": "full",
            "num_layers": n_layers,
            "base_model_name_or_path": str(base_path),
            "backend": backend,
            "medtune": opts.to_dict(),
        }
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
            raise BadInput(
                f"checkpoint does not fit this model ({missing[0]})",
                where=str(ckpt),
                hint="resume with the same --model and --num-layers",
            )
        with _torch().no_grad():
            for k, v in saved.items():
                params[k].copy_(v)
        return
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    expected = set(get_peft_model_state_dict(model))
    if set(saved) != expected:
        odd = sorted(set(saved) ^ expected)[0]
        raise BadInput(
            f"checkpoint does not fit this model and options ({odd})",
            where=str(ckpt),
            hint="resume with the same --model, --fine-tune-type, --rank, --num-layers and --target-modules",
        )
    set_peft_model_state_dict(model, saved)


def rng_states() -> dict:
    import random

    import numpy as np

    torch = _torch()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
    }


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


# ---- evaluation ---------------------------------------------------------------------------------
def evaluate(
    model, items, batch_size: int, max_batches: int, world: World, plan: Plan, device: Device, split=None
) -> float:
    """Mean loss over the label tokens of `items`; with several processes each takes its share of every
    batch and the sums are combined, so the result is one process's."""
    torch = _torch()
    total = count = 0.0
    with torch.no_grad():
        for g in eval_groups(len(items), batch_size, max_batches):
            mine = g[world.rank :: world.size]
            if not mine:
                continue
            ids, labels, _ = make_batch(items, mine)
            loss, n = forward_loss(model, ids, labels, plan, device, split)
            total += float(loss) * n
            count += n
    total, count = world.sum([total, count])
    return total / max(count, 1)


def forward_loss(model, ids, labels, plan: Plan, device: Device, split=None):
    """(mean cross-entropy over the label tokens, number of label tokens).

    The input stops after the last position that predicts a label (causal attention never looks further).
    With the model's split (medtune.train.loss.torch_split), logits exist only at label positions, a chunk
    of rows at a time (forward and backward); without it they are computed from the first label position
    on (transformers' logits_to_keep). The loss is float32.
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
        if split is not None:
            h = split.body(input_ids=ids[:, :hi], use_cache=False).last_hidden_state
            targets = labels[:, 1 : hi + 1]
            picked = targets != IGNORE
            return losses.torch_chunked_ce(split.head, h[picked], targets[picked], split.rows) / n, n
        keep = _logits_to_keep(model)
        kw = {keep: hi - lo} if keep else {}
        logits = model(input_ids=ids[:, :hi], use_cache=False, **kw).logits[:, -(hi - lo) :]
    targets = labels[:, lo + 1 : hi + 1]
    ce = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
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

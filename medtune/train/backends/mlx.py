"""LoRA/DoRA/full fine-tuning on MLX (Apple Silicon, or CPU on Linux) through mlx_lm's Python API.

We use mlx_lm's model loading and LoRA layers, and medtune.train.loop around them: mlx_lm's `train()`
draws its own UI, and cannot save the optimizer or data position. Our loss (medtune.train.loss) counts
exactly the completion tokens as labels (mlx_lm's default mask also takes the padding slot after the last
token as a label), and computes logits only there, a chunk of rows at a time. Under `mlx.launch` each
process takes its share of every batch and the gradients are combined weighted by label tokens, so N
processes compute what one would on the whole batch.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from medtune.core import fsutil, runtime
from medtune.train import loss as losses
from medtune.train import preflight
from medtune.train.backends.base import Backend, Step
from medtune.train.data import eval_groups, padded
from medtune.train.options import TrainOptions
from medtune.train.targets import match_targets


class MLXBackend(Backend):
    name = "mlx"
    adapter_kind = "mlx"
    adapter_file = "adapters.safetensors"
    uses = ("mlx", "mlx-lm")

    @classmethod
    def refuses(cls, opts: TrainOptions) -> list[tuple[str, str]]:
        found = []
        if opts.load_in_4bit:
            found.append(
                (
                    "--load-in-4bit is a bitsandbytes (CUDA) option; the mlx backend trains QLoRA on a base "
                    "quantized by MLX",
                    "mlx_lm.convert --hf-path MODEL --mlx-path q4 -q, then --model q4; "
                    "or --backend torch on a CUDA GPU",
                )
            )
        if opts.precision != "auto":
            found.append(
                (
                    f"--precision {opts.precision} is not an mlx backend option (float32 on CPU, the model's "
                    "own dtype on Apple GPUs)",
                    "drop --precision, or use --backend torch",
                )
            )
        return found

    # ---- loading -------------------------------------------------------------------------------------
    def open(self, model_ref, cfg: dict):
        mx = runtime.mx()
        mx.random.seed(self.opts.seed)
        self.model_ref, self.cfg = model_ref, cfg
        self.model, tokenizer = load_model(model_ref.path)
        self.world = mx.distributed.init()
        self.rank, self.size = self.world.rank(), self.world.size()
        return tokenizer

    def build(self, progress=None) -> None:
        """Freeze the model; LoRA/DoRA layers on the top --num-layers layers, or unfreeze them (full)."""
        from mlx_lm.tuner.utils import linear_to_lora_layers

        model, opts = self.model, self.opts
        self.n_layers = len(model.layers) if opts.num_layers < 0 else min(opts.num_layers, len(model.layers))
        model.freeze()
        keys = None
        if opts.adapter is not None:
            self._start_from_adapter(Path(opts.adapter))
        elif opts.fine_tune_type == "full":
            for layer in model.layers[len(model.layers) - self.n_layers :]:
                layer.unfreeze()
        else:
            keys = resolve_target_modules(model, opts.target_modules)
            linear_to_lora_layers(
                model, self.n_layers, lora_parameters(opts, keys), use_dora=opts.fine_tune_type == "dora"
            )
        if opts.grad_checkpoint:
            from mlx_lm.tuner.trainer import grad_checkpoint

            grad_checkpoint(model.layers[0])
        self.split = losses.mlx_split(model)
        self.loss = losses.mlx_loss(self.split) if opts.method == "sft" else self._preference_loss(grad=True)
        # written with the final weights, not now: a killed run must not leave a finished run's
        # adapters.safetensors beside another run's config
        if opts.adapter is None:
            self.config = adapter_config(opts, self.model_ref.path, self.n_layers, keys)

    def _start_from_adapter(self, folder: Path) -> None:
        """--adapter: the earlier run's LoRA/DoRA layers, as its adapter_config.json lays them out, with its
        weights; the adapter written at the end has the same layout (medtune fuse merges it as it is)."""
        from mlx_lm.tuner.utils import linear_to_lora_layers

        from medtune.adapters import as_mlx
        from medtune.core.errors import BadInput
        from medtune.fuse import adapter_kind, adapter_weights, read_adapter_config

        given = folder
        folder = as_mlx(folder, self.model_ref.path)  # a PEFT adapter (torch, Unsloth) converted, exactly
        acfg = read_adapter_config(folder)
        if adapter_kind(acfg) != "mlx" or acfg.get("fine_tune_type", "lora") == "full":
            raise BadInput(
                f"--init-adapter {given} is not a LoRA/DoRA adapter",
                hint="pass the --out folder of a LoRA run (mlx_lm's or PEFT's)",
            )
        self.n_layers = int(acfg["num_layers"])
        dora = acfg.get("fine_tune_type") == "dora"
        linear_to_lora_layers(self.model, self.n_layers, acfg["lora_parameters"], use_dora=dora)
        from mlx.utils import tree_flatten

        mx = runtime.mx()
        weights = mx.load(str(adapter_weights(folder, acfg)))
        params = dict(tree_flatten(self.model.parameters()))
        wrong = next((k for k, v in weights.items() if k not in params or params[k].shape != v.shape), None)
        if wrong is not None:  # mlx's load_weights(strict=False) checks no shape
            theirs = (
                f"the model's is {tuple(params[wrong].shape)}" if wrong in params else "the model has no such layer"
            )
            raise BadInput(
                f"--init-adapter {given} does not fit this model: {wrong} is {tuple(weights[wrong].shape)}, {theirs}",
                where=str(given),
                hint="the adapter's base_model: start from an adapter trained on this --model",
            )
        self.model.load_weights(list(weights.items()), strict=False)
        self.config = {**acfg, "base_model": str(self.model_ref.path), "medtune": self.opts.to_dict()}

    def preflight(self, train_items, steps: int, loaded: bool) -> dict | None:
        if not loaded:
            return None  # sized from the model with its adapter layers
        from mlx.utils import tree_flatten

        from medtune.core.resources import available_memory

        params = tree_flatten(self.model.parameters())
        total = sum(v.size for _, v in params)
        trainable = sum(v.size for _, v in tree_flatten(self.model.trainable_parameters()))
        param_bytes = max(1, int(sum(v.nbytes for _, v in params) / max(total, 1)))
        _, seq = preflight.longest_batch(train_items)  # a pair's longer side: a batch of pairs is as wide
        rows = self.opts.batch_size * (1 if self.opts.method == "sft" else 2)  # and holds both sides
        est = preflight.estimate_memory(
            self.cfg,
            total * param_bytes,
            trainable,
            rows,
            seq,
            self.n_layers,
            self.opts.grad_checkpoint,
            act_bytes=activation_bytes(self.model),
            loss="chunked" if self.split is not None else "plain",
        )
        # mlx is imported by now, so on Apple Silicon this is Metal's working set
        return preflight.figures(total, trainable, self.opts, train_items, steps, est, available_memory())

    # ---- training ------------------------------------------------------------------------------------
    def make_optimizer(self, steps: int) -> None:
        import mlx.optimizers as optim

        self.optimizer = optim.Adam(learning_rate=make_schedule(self.opts, steps))
        self.optimizer.init(self.model.trainable_parameters())

    def load_checkpoint(self, ckpt: Path) -> None:
        mx = runtime.mx()
        from mlx.utils import tree_flatten, tree_unflatten

        self.model.load_weights(list(mx.load(str(ckpt / "adapters.safetensors")).items()), strict=False)
        saved = mx.load(str(ckpt / "optimizer.safetensors"))
        current = dict(tree_flatten(self.optimizer.state))
        current.update(saved)
        self.optimizer.state = tree_unflatten(list(current.items()))
        mx.eval(self.model.parameters(), self.optimizer.state)

    def start(self) -> None:
        """Compile the step functions: after any checkpoint is loaded, since compile captures these very
        state objects."""
        mx = runtime.mx()
        import mlx.nn as nn

        model, optimizer = self.model, self.optimizer
        loss_and_grad = nn.value_and_grad(model, self.loss)
        self._state = state = [model.state, optimizer.state, mx.random.state]

        def combined(*batch):
            (loss, ntoks), grads = loss_and_grad(model, *batch)
            return self._combine(loss, ntoks, grads)

        @partial(mx.compile, inputs=state, outputs=state)
        def step_one(*batch):
            loss, ntoks, grads = combined(*batch)
            optimizer.update(model, grads)
            return loss, ntoks

        self._step_one = step_one
        self._micro = partial(mx.compile, inputs=state, outputs=state)(combined)
        model.train()
        mx.reset_peak_memory()  # the run's own peak, not whatever this process held before

    def _combine(self, loss, ntoks, grads):
        """Loss and gradients of the whole (global) batch: each process's share weighted by its label
        tokens, so N processes compute exactly what one process would on the full batch."""
        if self.size == 1:
            return loss, ntoks, grads
        mx = runtime.mx()
        from mlx.utils import tree_map

        total = mx.distributed.all_sum(ntoks)
        weight = ntoks / total
        grads = tree_map(lambda g: mx.distributed.all_sum(g * weight), grads)
        return mx.distributed.all_sum(loss * weight), total, grads

    def reseed(self, seed: int) -> None:
        mx = runtime.mx()
        mx.random.seed(seed)
        mx.eval(mx.random.state)  # the compiled step takes the generator's key as an input: materialise it

    def _preference_loss(self, grad: bool):
        from medtune.train.preference import mlx_preference_loss

        weight = self.opts.beta if self.opts.method == "dpo" else self.opts.orpo_lambda
        return mlx_preference_loss(self.split, self.opts.method, weight, grad=grad)

    def _pairs_step(self, items, draw) -> Step:
        """One update on a batch of preference pairs: the loss, its metrics (reward margin, accuracy, …)."""
        mx = runtime.mx()
        from medtune.train.preference import mlx_batch, pair_batch

        if self.size > 1:
            from medtune.core.errors import BadInput

            raise BadInput(f"--method {self.opts.method} trains in one process for now", hint="run without mlx.launch")
        pb = pair_batch(items, draw(), items.ref)
        loss, metrics = self._step_one(*mlx_batch(pb))
        mx.eval(self._state, loss, metrics)
        lr = self.optimizer.learning_rate
        extra = {k: v.item() for k, v in metrics.items()}
        return Step(
            loss.item(),
            pb.tokens,
            int(pb.segments.sum()),
            lr.item() if isinstance(lr, mx.array) else float(lr),
            extra=extra,
        )

    def reference_logps(self, pairs) -> tuple:
        from medtune.train.preference import mlx_reference_logps

        return mlx_reference_logps(self.model, pairs, self.opts.batch_size, split=self.split, adapter_off=False)

    def step(self, items, draw) -> Step:
        mx = runtime.mx()
        if self.opts.method != "sft":
            return self._pairs_step(items, draw)
        if self.opts.grad_accum == 1:
            batch = make_batch(items, draw())
            loss, ntoks = self._step_one(*batch)
            mx.eval(self._state, loss, ntoks)
            n_tok, loss_v, n_lab = self._tokens_in(batch[1]), loss.item(), int(ntoks.item())
        else:
            loss_v, n_tok, n_lab = self._accumulate(items, draw)
        lr = self.optimizer.learning_rate
        return Step(loss_v, n_tok, n_lab, lr.item() if isinstance(lr, mx.array) else float(lr))

    def _accumulate(self, items, draw) -> tuple[float, int, int]:
        """grad_accum micro-batches, their gradients averaged into one update: (loss, tokens, label tokens)."""
        mx = runtime.mx()
        from mlx.utils import tree_map

        acc, losses, n_tok, n_lab = None, 0.0, 0, 0
        for _ in range(self.opts.grad_accum):
            batch = make_batch(items, draw())
            loss, ntoks, grads = self._micro(*batch)
            acc = grads if acc is None else tree_map(lambda a, b: a + b, acc, grads)
            mx.eval(acc, loss, ntoks)
            losses += loss.item()
            n_tok += self._tokens_in(batch[1])
            n_lab += int(ntoks.item())
        self.optimizer.update(self.model, tree_map(lambda g: g / self.opts.grad_accum, acc))
        mx.eval(self.model.parameters(), self.optimizer.state)
        return losses / self.opts.grad_accum, n_tok, n_lab

    def _tokens_in(self, lengths) -> int:
        mx = runtime.mx()
        n = lengths[:, 1].sum()
        return int((mx.distributed.all_sum(n, stream=mx.cpu) if self.size > 1 else n).item())

    def eval_loss(self, items, max_batches: int = -1) -> float:
        self.model.eval()
        if self.opts.method != "sft":
            loss, self.eval_metrics = self._eval_pairs(items, max_batches)
        else:
            loss = evaluate(self.model, items, self.opts.batch_size, max_batches, self.world, self.split)
        self.model.train()
        return loss

    def _eval_pairs(self, pairs, max_batches: int) -> tuple[float, dict]:
        """The preference loss and its metrics over the validation pairs, each batch weighted by its pairs."""
        mx = runtime.mx()
        from medtune.train.preference import mlx_batch, pair_batch

        loss_fn, total, sums = self._preference_loss(grad=False), 0.0, {}
        groups = eval_groups(len(pairs), self.opts.batch_size, max_batches)
        for group in groups:
            loss, metrics = loss_fn(self.model, *mlx_batch(pair_batch(pairs, group, pairs.ref)))
            mx.eval(loss, metrics)
            total += loss.item() * len(group)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v.item() * len(group)
        n = sum(len(g) for g in groups)
        return total / n, {k: v / n for k, v in sums.items()}

    def peak_memory_gb(self) -> float:
        return runtime.mx().get_peak_memory() / 1e9

    def final_peak_memory_gb(self) -> float:
        """MLX's own peak counter since the first step (what the preflight estimated)."""
        return self.peak_memory_gb()

    # ---- outputs -------------------------------------------------------------------------------------
    def _weights(self) -> dict:
        from mlx.utils import tree_flatten

        return dict(tree_flatten(self.model.trainable_parameters()))

    def save_checkpoint(self, folder: Path) -> None:
        """The adapter (with its adapter_config.json: the folder loads as an adapter) and the optimizer state."""
        mx = runtime.mx()
        from mlx.utils import tree_flatten

        mx.save_safetensors(str(folder / "adapters.safetensors"), self._weights())
        opt = {k: v for k, v in tree_flatten(self.optimizer.state) if isinstance(v, mx.array)}
        mx.save_safetensors(str(folder / "optimizer.safetensors"), opt)
        fsutil.write_json(folder / "adapter_config.json", self.config)

    def save_adapter(self, folder: Path) -> None:
        weights = self._weights()
        with fsutil.atomic_path(folder / self.adapter_file) as tmp:
            runtime.mx().save_safetensors(str(tmp), weights)
        fsutil.write_json(folder / "adapter_config.json", self.config)


# ---- the model ------------------------------------------------------------------------------------
def load_model(model_dir: Path):
    mx = runtime.mx()
    from mlx_lm import load

    from medtune.core import safety

    try:
        model, tokenizer = load(str(model_dir), **safety.mlx_load_kwargs())
    except (ValueError, FileNotFoundError, KeyError, RuntimeError, OSError) as exc:  # RuntimeError: a bad safetensors
        from medtune.models.modelcheck import load_failure

        raise load_failure(model_dir, exc, "mlx_lm") from exc
    if runtime.on_cpu():
        model.set_dtype(mx.float32)  # bf16/fp16 matmuls are slow on MLX's CPU backend
    return model, tokenizer


def lora_parameters(opts: TrainOptions, keys: list[str] | None) -> dict:
    params = {"rank": opts.rank, "scale": opts.lora_scale, "dropout": opts.dropout}
    if keys:
        params["keys"] = keys
    return params


def adapter_config(opts: TrainOptions, model_dir: Path, n_layers: int, keys: list[str] | None) -> dict:
    """mlx_lm's adapter_config.json (mlx_lm.tuner.utils.load_adapters reads it), with our options."""
    return {
        "fine_tune_type": opts.fine_tune_type,
        "num_layers": n_layers,
        "lora_parameters": lora_parameters(opts, keys),
        "base_model": str(model_dir),
        "medtune": opts.to_dict(),
    }


def resolve_target_modules(model, names: list[str] | None) -> list[str] | None:
    """Short names (q_proj) -> the module paths inside a layer (self_attn.q_proj) that mlx_lm expects."""
    if not names:
        return None
    import mlx.nn as nn

    linear = [n for n, m in model.layers[0].named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear))]
    return match_targets(linear, names)


def make_schedule(opts: TrainOptions, steps: int):
    """The learning rate: warm-up (never a zero-lr step), then constant, cosine or linear decay to 0."""
    import mlx.optimizers as optim

    if opts.lr_schedule == "constant" and not opts.warmup:
        return opts.lr
    decay_steps = max(1, steps - opts.warmup)
    if opts.lr_schedule == "cosine":
        main = optim.cosine_decay(opts.lr, decay_steps, 0.0)
    elif opts.lr_schedule == "linear":
        main = optim.linear_schedule(opts.lr, 0.0, decay_steps)
    else:
        main = lambda step: opts.lr  # noqa: E731
    if not opts.warmup:
        return main
    warm = optim.linear_schedule(opts.lr / (opts.warmup + 1), opts.lr, opts.warmup)
    return optim.join_schedules([warm, main], [opts.warmup])


# ---- batches and the loss (public: medtune eval scores held-out records with them) ---------------------
def make_batch(items, group: list[int]):
    """(token ids padded to a multiple of 32, [[offset, length]] per row, the label positions and their
    weights: medtune.train.loss.label_picks) for the items in `group`, as MLX arrays."""
    import numpy as np

    mx = runtime.mx()
    seqs = [items[i][0] for i in group]
    arr = np.zeros((len(seqs), padded(max(len(s) for s in seqs))), dtype=np.int32)
    for j, s in enumerate(seqs):
        arr[j, : len(s)] = s
    lengths = np.array([[items[i][1], len(items[i][0])] for i in group], dtype=np.int32)
    picks, weights = losses.label_picks(lengths, arr.shape[1])
    return mx.array(arr), mx.array(lengths), mx.array(picks), mx.array(weights)


def activation_bytes(model) -> int:
    """Bytes per activation value: the dtype of the model's norms (float32 on CPU, the model's own on a Mac)."""
    from mlx.utils import tree_flatten

    sizes = [v.dtype.size for k, v in tree_flatten(model.parameters()) if k.endswith("norm.weight")]
    return sizes[0] if sizes else 4


def evaluate(model, items, batch_size: int, max_batches: int = -1, world=None, split=False) -> float:
    """Mean loss over the label tokens of `items`; with several processes each takes its share of every
    batch and the sums are combined, so the result is the same as one process's. split: the model's
    losses.mlx_split (found here when not given; None: the plain loss)."""
    mx = runtime.mx()
    loss_fn = losses.mlx_loss(losses.mlx_split(model) if split is False else split, grad=False)
    rank, size = (world.rank(), world.size()) if world is not None else (0, 1)
    total, count = mx.array(0.0), mx.array(0.0)
    for g in eval_groups(len(items), batch_size, max_batches):
        mine = g[rank::size]
        if not mine:
            continue
        loss, ntoks = loss_fn(model, *make_batch(items, mine))
        total = total + loss * ntoks
        count = count + ntoks
        mx.eval(total, count)
    if size > 1:
        total, count = mx.distributed.all_sum(total, stream=mx.cpu), mx.distributed.all_sum(count, stream=mx.cpu)
        mx.eval(total, count)
    return total.item() / max(count.item(), 1)

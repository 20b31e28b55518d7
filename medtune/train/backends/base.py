"""What a training backend is: the small protocol medtune.train.loop drives.

The loop owns everything that is the same on every framework: records and batch order, the run state,
eval/save cadence, Ctrl-C, metrics.jsonl, checkpoints and resume, the preflight verdict, the manifest.
A backend owns the framework: loading the model and its tokenizer, attaching the adapter, one optimizer
step, the loss on a batch, saving and restoring weights, optimizer and random state, peak memory, and
what it refuses. A backend module imports nothing heavy at the top (mlx, torch, transformers are imported
inside its methods): `--backend` resolution loads every backend class.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from medtune.train.options import TrainOptions


@dataclass
class Step:
    """One optimizer step, as the metrics report it (sums over every process of the run)."""

    loss: float  # mean over the step's label tokens (its micro-batches averaged)
    tokens: int  # tokens in the step's batches, padding excluded
    label_tokens: int
    learning_rate: float  # the rate this step's update used
    overflow: bool = False  # fp16 loss scaling skipped the update (inf/nan gradients)
    extra: dict = field(default_factory=dict)  # more metrics of the step (preference methods: margin, accuracy)


class Backend:
    """One training framework. Subclasses set the class attributes and implement the methods that raise."""

    name: str = ""
    adapter_kind: str = ""  # what `medtune fuse` finds in --out: "mlx" (mlx_lm's adapter) or "peft"
    adapter_file: str = ""  # the adapter weights file in --out
    packages: tuple = ()  # distributions whose versions the manifest records (beside prepare's: loop.versions)
    uses: tuple = ()  # distributions whose versions can change what it writes (medtune run's train fingerprint)
    detailed_refusal: bool = True  # the memory refusal names the estimate's parts

    def __init__(self, opts: TrainOptions):
        self.opts = opts
        self.rank, self.size = 0, 1  # this process, and how many train together (set by open)

    # ---- before loading ----------------------------------------------------------------------------
    @classmethod
    def refuses(cls, opts: TrainOptions) -> list[tuple[str, str]]:
        """(message, hint) for every option this backend cannot honour on any machine."""
        return []

    def check_available(self) -> None:
        """Raise MissingDependency (exit 3) when the framework is not installed or cannot run here."""

    def open(self, model_ref, cfg: dict):
        """Prepare to train the model `model_ref` (config `cfg`): the device, the processes (rank, size),
        what the backend refuses on this machine; return the tokenizer."""
        raise NotImplementedError

    def preflight(self, train_items, steps: int, loaded: bool) -> dict | None:
        """medtune.train.preflight.figures for this run; loaded=False before build (None: cannot tell yet)."""
        raise NotImplementedError

    def memory_tips(self) -> list[str]:
        """Ways to need less memory that only this backend has (the loop adds the common ones)."""
        return []

    def build(self, progress=None) -> None:
        """Load the weights (if open did not) and attach the adapter: the model is trainable."""
        raise NotImplementedError

    # ---- training ----------------------------------------------------------------------------------
    def any(self, flag: bool) -> bool:
        """Whether any process of the run says `flag` (every process decides the same)."""
        return flag

    def make_optimizer(self, steps: int) -> None:
        raise NotImplementedError

    def load_checkpoint(self, ckpt: Path) -> None:
        """Restore the adapter, optimizer and random state saved by save_checkpoint (state.json is the loop's)."""
        raise NotImplementedError

    def start(self) -> None:
        """Called once before the first step (after any resume): the model is in training mode."""

    def reseed(self, seed: int) -> None:
        """Seed the framework's generator (dropout) before a micro-batch: resume draws the same numbers."""
        raise NotImplementedError

    def step(self, items, draw: Callable[[], list[int]]) -> Step:
        """One optimizer step over opts.grad_accum micro-batches; draw() gives each micro-batch's indices
        into `items` (this process's share), reseeding first."""
        raise NotImplementedError

    def reference_logps(self, pairs) -> tuple:
        """DPO: (chosen, rejected) summed completion log-probs of every pair under the model as built (no
        gradient), numpy arrays in pair order."""
        raise NotImplementedError

    def eval_loss(self, items, max_batches: int = -1) -> float:
        """Mean loss over the label tokens of `items` (all processes together), in eval mode."""
        raise NotImplementedError

    def peak_memory_gb(self) -> float:
        raise NotImplementedError

    # ---- outputs -----------------------------------------------------------------------------------
    def checkpoint_state(self) -> dict:
        """Keys the backend adds to a checkpoint's state.json."""
        return {}

    def save_checkpoint(self, folder: Path) -> None:
        """The adapter (loadable as it is), optimizer and random state, into a checkpoint folder."""
        raise NotImplementedError

    def save_adapter(self, folder: Path) -> None:
        """The trained adapter: adapter_file and adapter_config.json, each renamed into place."""
        raise NotImplementedError

    def final_peak_memory_gb(self) -> float | None:
        """The peak the result and manifest report (None: not reported)."""
        return None

    def title_suffix(self) -> str:
        """Said after the model in the loss plot's title."""
        return ""

    def manifest_fields(self, result) -> dict:
        """Keys the backend adds to the run's manifest (after stage, backend, processes)."""
        return {}

    def close(self) -> None:
        """Release what open acquired (a process group)."""

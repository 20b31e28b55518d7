"""What every engine decodes with, so that two engines given the same logits pick the same tokens.

- the repetition penalty (the value medtune's Modelfile sets for Ollama, and the rule: mlx_lm's processor and
  llama.cpp's sampler apply it the same way), in numpy, for the engines whose greedy loop is ours;
- `Greedy`, what an engine's greedy decode returns;
- `log_softmax`, the float64 log-probabilities the loss, the multiple-choice scores and the KL divergence use.

Numpy only, imported inside the functions: `medtune --help` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# The repetition penalty medtune's Modelfile sets for Ollama, so that `medtune chat`/`generate` and
# `ollama run` decode with the same penalty. It is written out explicitly: Ollama's own default is 1.0 (no
# penalty) in current releases, and was 1.1 up to v0.24.
REPEAT_PENALTY = 1.1
REPEAT_LAST_N = 64

Penalty = tuple[float, int]  # (penalty, last_n)
MODELFILE_PENALTY: Penalty = (REPEAT_PENALTY, REPEAT_LAST_N)


def apply_repeat_penalty(row, history: list[int], penalty: float = REPEAT_PENALTY, last_n: int = REPEAT_LAST_N):
    """The penalty rule `generate` applies through mlx_lm (and llama.cpp's sampler): every distinct token among
    the last `last_n` of `history` (prompt + answer so far) has a positive logit divided by `penalty` and a
    negative one multiplied by it. Numpy, in place; the greedy loops of both engines use it."""
    import numpy as np

    if penalty == 1.0 or last_n <= 0 or not history:
        return row
    seen = np.fromiter(set(history[-last_n:]), dtype=np.int64)
    picked = row[seen]
    row[seen] = np.where(picked < 0, picked * penalty, picked / penalty)
    return row


def pick_greedy(row, history: list[int], penalty: Optional[Penalty]) -> int:
    """The next token: the largest logit of `row` (float32 numpy, changed in place) after the penalty, if any."""
    if penalty is not None:
        apply_repeat_penalty(row, history, *penalty)
    return int(row.argmax())


@dataclass
class Greedy:
    """An engine's greedy continuation of a prompt."""

    tokens: list[int]  # the generated ids, the end token included when it stopped (as mlx_lm counts them)
    stopped: bool  # ended on an end token, not cut at max_tokens
    rows: Optional[list] = None  # with rows=True: the logits (float32 numpy, before any penalty) before each token
    end_in_tokens: bool = True  # False where the engine does not return the end token (llama-server)

    @property
    def finish(self) -> str:
        """ "stop" or "length", as mlx_lm and the eval report name them."""
        return "stop" if self.stopped else "length"

    @property
    def answer_tokens(self) -> list[int]:
        """The generated ids without the end token."""
        return self.tokens[:-1] if self.stopped and self.end_in_tokens else self.tokens


def log_softmax(rows):
    """float64 log-softmax of each row of a 2-D array (stable: the row's maximum is taken out first)."""
    import numpy as np

    rows = np.asarray(rows, dtype=np.float64)
    peak = rows.max(axis=1, keepdims=True)
    return rows - (peak + np.log(np.exp(rows - peak).sum(axis=1, keepdims=True)))


def picked(logprobs, ids: list[int], start: int):
    """The log-probability each of `logprobs`' rows (positions start..) gives the token that actually follows."""
    import numpy as np

    targets = np.asarray(ids[start + 1 :])
    return logprobs[np.arange(len(targets)), targets]

"""Training records, backend-neutral: prepared JSONL → checked, tokenised items → seeded batch order.

An item is (token ids, offset): the labels are the tokens at positions offset..len-1 (the completion).
Every backend takes the same items in the same order, so the same run sees the same batches on MLX and
PyTorch. numpy only; no backend is imported here.
"""

from __future__ import annotations

import math
from pathlib import Path

from medtune.core.errors import BadInput

PAD_MULTIPLE = 32  # batches are padded to a multiple of this many tokens (fewer compiled shapes on MLX)


def padded(length: int) -> int:
    """The width a batch whose longest sequence has `length` tokens is padded to."""
    return PAD_MULTIPLE * math.ceil(length / PAD_MULTIPLE)


def load_jsonl(path: Path) -> list[dict]:
    """A prepared file's records (medtune.core.jsonl: UTF-8, one object per line, file:line on errors)."""
    from medtune.core.jsonl import read_jsonl

    return read_jsonl(path)


class Pairs(list):
    """Preference items, ((prompt + chosen ids, offset), (prompt + rejected ids, offset)) each, with the reference
    model's summed completion log-probs over them (DPO): `ref` = (chosen, rejected) numpy arrays, or None."""

    ref = None


def item_length(item) -> int:
    """Tokens of an item: an SFT item's, or a pair's longer side (a batch of pairs is as wide as that)."""
    if isinstance(item[0], tuple):
        return max(len(item[0][0]), len(item[1][0]))
    return len(item[0])


def is_preference(rows: list[dict]) -> bool:
    from medtune.data import encode

    return bool(rows) and encode.is_pair(rows[0])


def check_rows(rows: list[dict], where: Path) -> None:
    """Records of a prepared file: there are some, and each has a style, or each is a pair (no tokenizer)."""
    from medtune.data import encode

    if not rows:
        raise BadInput("no records", where=str(where), hint="re-run `medtune prepare`")
    pairs = encode.is_pair(rows[0])
    for i, row in enumerate(rows):
        if pairs != encode.is_pair(row):
            raise BadInput(
                "preference pairs and other records mixed in one file",
                where=f"{where}:{i + 1}",
                hint="re-run `medtune prepare`",
            )
        if pairs:
            continue
        try:
            encode.style_of(row)
        except ValueError as exc:
            raise BadInput(
                "record has none of prompt/completion, messages, text",
                where=f"{where}:{i + 1}",
                hint="re-run `medtune prepare`",
            ) from exc


def build_dataset(rows: list[dict], tokenizer, mask_prompt: bool, max_seq_length: int, where: Path):
    """Tokenise every record now (medtune.data.encode: the same rendering prepare checked), so that a
    bad record fails before the first step, not at 3 a.m."""
    from medtune.data import encode

    check_rows(rows, where)
    try:
        items = encode.encode_all(tokenizer, rows, mask_prompt)
    except ValueError as exc:
        raise BadInput(str(exc), where=str(where), hint="re-run `medtune prepare`, which checks every record") from exc
    for i, (tokens, offset) in enumerate(items):
        if len(tokens) > max_seq_length:
            raise BadInput(
                f"record is {len(tokens)} tokens, over --max-seq-length {max_seq_length}: "
                "truncating it would cut off its end token",
                where=f"{where}:{i + 1}",
                hint="raise --max-seq-length, or re-run prepare with the same --max-seq-length",
            )
        if offset >= len(tokens) - 1 and mask_prompt:
            raise BadInput(
                "record has no completion tokens to learn from (every label is masked)",
                where=f"{where}:{i + 1}",
                hint="check the record's completion",
            )
    return items


def build_pairs(rows: list[dict], tokenizer, max_seq_length: int, where: Path) -> Pairs:
    """Preference records tokenised now (medtune.data.encode.encode_pair_items), each side within
    --max-seq-length."""
    from medtune.data import encode

    try:
        items = Pairs(encode.encode_pair_items(tokenizer, rows))
    except ValueError as exc:
        raise BadInput(str(exc), where=str(where), hint="re-run `medtune prepare`, which checks every pair") from exc
    for i, item in enumerate(items):
        if item_length(item) > max_seq_length:
            raise BadInput(
                f"pair's longer side is {item_length(item)} tokens, over --max-seq-length {max_seq_length}",
                where=f"{where}:{i + 1}",
                hint="raise --max-seq-length, or re-run prepare with the same --max-seq-length",
            )
        if any(offset >= len(toks) for toks, offset in item):
            raise BadInput("pair has a side with no completion tokens", where=f"{where}:{i + 1}", hint="check it")
    return items


def batch_order(items, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Length-sorted batches, shuffled per epoch with a seeded generator (reproducible, resumable)."""
    import numpy as np

    idx = sorted(range(len(items)), key=lambda i: item_length(items[i]))
    groups = [idx[i : i + batch_size] for i in range(0, len(idx) - batch_size + 1, batch_size)]
    perm = np.random.RandomState(seed + epoch).permutation(len(groups))
    return [groups[p] for p in perm]


def eval_groups(n_items: int, batch_size: int, max_batches: int = -1) -> list[list[int]]:
    """Evaluation batches: the items in file order, `max_batches` of them at most (-1: all)."""
    groups = [list(range(i, min(i + batch_size, n_items))) for i in range(0, n_items, batch_size)]
    return groups[:max_batches] if max_batches > 0 else groups

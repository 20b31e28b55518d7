"""Quantized GGUFs judged as llama.cpp judges them: KL divergence against the unquantized file, teacher-forced.

    table = judge_quants("models/run/run-f16.gguf", ["models/run/run-q8_0.gguf", …], sequences)

Greedy agreement over 32 tokens cannot tell a good Q8_0 from a broken one on a small model (near-ties part
the continuations either way). What `llama-perplexity --kl-divergence` measures can: feed the same tokens to
the reference (F32/F16/BF16) and to the quant, and at every scored position compare the two next-token
distributions over the whole vocabulary:

- mean and 99th-percentile KL(reference ‖ quant), in nats;
- same top-1: how often both pick the same most likely token;
- ΔPPL: the quant's perplexity of the actual next tokens minus the reference's.

The positions scored are the held-out answers (prompt masked, as in training), so the figures speak of the
text the model was tuned to write. `crosscheck` runs llama-perplexity itself on a text file and our code on the
same chunks (llama-perplexity's protocol: chunks of n_ctx tokens, BOS first, the second half scored), so the two
implementations can be compared number for number.

Both runtimes are llama.cpp (medtune.runtimes.llamacpp: in process, the log-probs of every position); the reference's log-probs
are kept in a temporary file between the passes (positions x vocabulary float32), not in memory.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from medtune.core.errors import BadInput, MedtuneError
from medtune.eval.fidelity import gguf_file_type

# Verdict thresholds (nats / fraction). llama.cpp publishes, on 7-8B models: Q8_0 mean KLD 0.0004-0.0014 and
# 97.7-98.9% same top; Q6_K 0.0055 / 96.0%; Q4_K_M 0.013-0.031 / 91.9-94.7%. Small models are more sensitive.
# Measured on the fused SmolLM2-135M of `make all` (held-out answers, 322 tokens): Q8_0 0.0057 / p99 0.046 / 95.3%;
# Q6_K 0.0137 / 0.064 / 92.2%; Q5_K_M 0.121 / 0.92 / 79.8%; Q4_K_M 0.093 / 0.77 / 83.2%; Q4_0 0.415 / 2.06 / 66.1%;
# on 5,292 tokens of the sample's answers Q8_0 gives 0.0082 / 0.066 / 93.5%. "good": what Q8_0 and Q6_K keep on
# this small model (the class of Q6_K/Q8_0 on large ones); "usable": a Q4_K_M-class loss; beyond that, "poor".
THRESHOLDS = {
    "good": {"mean_kld": 0.015, "p99_kld": 0.15, "same_top": 0.92},
    "usable": {"mean_kld": 0.10, "p99_kld": 1.0, "same_top": 0.80},
}
REFERENCE_TYPES = ("F32", "F16", "BF16")
MAX_POSITIONS = 4096  # scored positions per file, by default (the reference's log-probs: positions x vocab x 4 bytes)


@dataclass
class QuantStats:
    file: str
    file_type: str
    bytes: int
    positions: int
    mean_kld: float
    p99_kld: float
    max_kld: float
    same_top: float  # fraction
    ppl: float
    ref_ppl: float
    verdict: str = ""  # "good", "usable", "poor"
    why: str = ""
    lora: Optional[str] = None  # a LoRA GGUF llama.cpp applied on top of `file` (Ollama's ADAPTER)

    @property
    def delta_ppl(self) -> float:
        return self.ppl - self.ref_ppl

    @property
    def name(self) -> str:
        """The file's name, and the LoRA GGUF's on top of it ("base-f16.gguf + cardio-lora-f16.gguf")."""
        return Path(self.file).name + (f" + {Path(self.lora).name}" if self.lora else "")

    def to_dict(self) -> dict:
        return {**asdict(self), "delta_ppl": self.delta_ppl, "name": self.name}


@dataclass
class QuantTable:
    reference: str
    reference_type: str
    reference_ppl: float
    positions: int
    rows: list[QuantStats] = field(default_factory=list)
    thresholds: dict = field(default_factory=lambda: THRESHOLDS)

    @property
    def recommended(self) -> Optional[QuantStats]:
        """The smallest file that is "good", else the smallest "usable" one."""
        for level in ("good", "usable"):
            ok = [r for r in self.rows if r.verdict == level or (level == "usable" and r.verdict == "good")]
            if ok:
                return min(ok, key=lambda r: r.bytes)
        return None

    def to_dict(self) -> dict:
        best = self.recommended
        return {
            "reference": self.reference,
            "reference_type": self.reference_type,
            "reference_ppl": self.reference_ppl,
            "positions": self.positions,
            "thresholds": self.thresholds,
            "rows": [r.to_dict() for r in self.rows],
            "recommended": best.file if best else None,
            "recommended_name": best.name if best else None,
        }


def judge(s: QuantStats) -> QuantStats:
    import math

    if not all(math.isfinite(v) for v in (s.mean_kld, s.p99_kld, s.ppl)):
        s.verdict, s.why = "poor", "non-finite logits (NaN or inf): a damaged tensor"
        return s
    for level in ("good", "usable"):
        t = THRESHOLDS[level]
        if s.mean_kld <= t["mean_kld"] and s.p99_kld <= t["p99_kld"] and s.same_top >= t["same_top"]:
            s.verdict, s.why = level, ""
            return s
    t = THRESHOLDS["usable"]
    over = [
        f"mean KLD {s.mean_kld:.3g} > {t['mean_kld']}" if s.mean_kld > t["mean_kld"] else "",
        f"p99 KLD {s.p99_kld:.3g} > {t['p99_kld']}" if s.p99_kld > t["p99_kld"] else "",
        f"same top {100 * s.same_top:.1f}% < {100 * t['same_top']:.0f}%" if s.same_top < t["same_top"] else "",
    ]
    s.verdict, s.why = "poor", "; ".join(o for o in over if o)
    return s


# ---- the token sequences --------------------------------------------------------------------------------
Sequence = tuple[list[int], int]  # (token ids, start): rows start..len-2 are scored, predicting ids[start+1:]


def heldout_sequences(model_dir: str | Path, data: str | Path, limit: int | None = None) -> list[Sequence]:
    """The held-out records (test.jsonl, else valid.jsonl) tokenized as training did (the fused folder's
    tokenizer, medtune.data.encode), scored on their answers only."""
    from transformers import AutoTokenizer

    from medtune.eval.evaluate import _read_jsonl, heldout_file
    from medtune.train.data import build_dataset

    path = heldout_file(Path(data))
    rows = _read_jsonl(path)[:limit] if limit else _read_jsonl(path)
    if not rows:
        raise BadInput(
            "no held-out records to score", where=str(path), hint="prepare with --valid-ratio or --test-ratio"
        )
    tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    return [(ids, offset - 1) for ids, offset in build_dataset(rows, tok, True, 1 << 30, path)]


def chunk_sequences(ids: list[int], n_ctx: int, bos: Optional[int]) -> list[Sequence]:
    """llama-perplexity's protocol: whole chunks of n_ctx tokens, the first replaced by BOS (when the model
    adds one), positions n_ctx/2 .. n_ctx-2 scored."""
    out = []
    for i in range(len(ids) // n_ctx):
        chunk = list(ids[i * n_ctx : (i + 1) * n_ctx])
        if bos is not None:
            chunk[0] = bos
        out.append((chunk, n_ctx // 2))
    return out


def _cap(seqs: list[Sequence], max_positions: int) -> list[Sequence]:
    kept, total = [], 0
    for ids, start in seqs:
        n = len(ids) - 1 - start
        if n <= 0:
            continue
        if total + n > max_positions:
            break
        kept.append((ids, start))
        total += n
    if not kept:
        raise BadInput(
            "no positions to score (every sequence is empty or longer than --max-positions)",
            hint="raise --max-positions",
        )
    return kept


# ---- running llama.cpp ----------------------------------------------------------------------------------
def _load(path: Path, n_ctx: int, n_threads: int | None, lora: Optional[Path] = None):
    """A GGUF (with a LoRA GGUF on top) in llama-cpp-python with the logits of every position
    (medtune.runtimes.llamacpp.logprobs)."""
    from medtune.runtimes.llamacpp import load_gguf

    return load_gguf(
        path,
        n_ctx,
        n_threads=n_threads,
        logits_all=True,
        n_batch=n_ctx,
        purpose="the KL divergence of quantized GGUFs",
        lora=lora,
    )


def _n_ctx(seqs: list[Sequence]) -> int:
    return -(-max(len(ids) for ids, _ in seqs) // 64) * 64


def _reference_pass(ref: Path, seqs: list[Sequence], store: Path, n_threads, progress=None):
    """Write the reference's log-probs of every scored position to `store`; returns (memmap, nll, top-1)."""
    import numpy as np

    from medtune.runtimes.llamacpp import logprobs

    model = _load(ref, _n_ctx(seqs), n_threads)
    total = sum(len(ids) - 1 - start for ids, start in seqs)
    mm = np.lib.format.open_memmap(store, mode="w+", dtype=np.float32, shape=(total, model.n_vocab()))
    nll, top, pos = np.empty(total), np.empty(total, dtype=np.int64), 0
    task = progress.add_task(f"reference {ref.name}", total=len(seqs)) if progress else None
    try:
        for ids, start in seqs:
            lp = logprobs(model, ids, start)
            n = len(lp)
            mm[pos : pos + n] = lp
            nll[pos : pos + n] = -lp[np.arange(n), np.asarray(ids[start + 1 :])]
            top[pos : pos + n] = lp.argmax(axis=1)
            pos += n
            if progress:
                progress.advance(task)
    finally:
        model.close()
    mm.flush()
    return mm, nll, top


def _quant_pass(path: Path, seqs: list[Sequence], ref, n_threads, progress=None, lora=None) -> QuantStats:
    import numpy as np

    from medtune.runtimes.llamacpp import logprobs

    mm, ref_nll, ref_top = ref
    model = _load(path, _n_ctx(seqs), n_threads, lora)
    if model.n_vocab() != mm.shape[1]:
        model.close()
        raise BadInput(
            f"vocabulary of {model.n_vocab()} tokens, the reference has {mm.shape[1]}",
            where=str(path),
            hint="compare quants of the same model",
        )
    kld, nll, same, pos = [], [], 0, 0
    task = progress.add_task(f"KL divergence {path.name}", total=len(seqs)) if progress else None
    try:
        for ids, start in seqs:
            lq = logprobs(model, ids, start)
            n = len(lq)
            lr = np.asarray(mm[pos : pos + n], dtype=np.float64)
            kld.append((np.exp(lr) * (lr - lq)).sum(axis=1))
            nll.append(-lq[np.arange(n), np.asarray(ids[start + 1 :])])
            same += int((lq.argmax(axis=1) == ref_top[pos : pos + n]).sum())
            pos += n
            if progress:
                progress.advance(task)
    finally:
        model.close()
    k = np.maximum(np.concatenate(kld), 0.0)  # rounding can make a KL divergence of ~0 slightly negative
    q_nll = np.concatenate(nll)
    return QuantStats(
        file=str(path),
        file_type=gguf_file_type(path),
        bytes=path.stat().st_size,
        positions=len(k),
        mean_kld=float(k.mean()),
        p99_kld=float(np.percentile(k, 99)),
        max_kld=float(k.max()),
        same_top=same / len(k),
        ppl=float(np.exp(q_nll.mean())),
        ref_ppl=float(np.exp(ref_nll.mean())),
        lora=str(lora) if lora else None,
    )


def judge_quants(
    reference: str | Path,
    quants: list[str | Path],
    seqs: list[Sequence],
    *,
    max_positions: int = MAX_POSITIONS,
    n_threads: int | None = None,
    progress=None,
    workdir: str | Path | None = None,
) -> QuantTable:
    """KL divergence, same-top and ΔPPL of each quant against `reference` on `seqs`, with verdicts. A quant may be
    a pair (GGUF, LoRA GGUF): the base with an adapter on top, against e.g. the fused model's F16 GGUF."""
    import numpy as np

    reference = Path(reference)
    stacks = [(Path(q[0]), Path(q[1])) if isinstance(q, tuple) else (Path(q), None) for q in quants]
    for p in [reference, *(g for g, _ in stacks), *(lo for _, lo in stacks if lo)]:
        if not Path(p).is_file():
            raise BadInput(f"GGUF not found: {p}", hint="`medtune export -q f16,q8_0,q4_k_m` writes them")
    ref_type = gguf_file_type(reference)
    if ref_type not in REFERENCE_TYPES:
        raise BadInput(
            f"the reference is {ref_type}, a quantized type",
            where=str(reference),
            hint="pass the F16 (or F32/BF16) export as the reference",
        )
    seqs = _cap(seqs, max_positions)
    with tempfile.TemporaryDirectory(prefix=".medtune-kld-", dir=workdir) as tmp:
        ref = _reference_pass(reference, seqs, Path(tmp) / "reference.npy", n_threads, progress)
        table = QuantTable(
            reference=str(reference),
            reference_type=ref_type,
            reference_ppl=float(np.exp(ref[1].mean())),
            positions=len(ref[1]),
        )
        for q, lora in stacks:
            table.rows.append(judge(_quant_pass(q, seqs, ref, n_threads, progress, lora)))
        del ref
    table.rows.sort(key=lambda r: -r.bytes)
    return table


# ---- llama-perplexity's own figures on the same text ---------------------------------------------------------
_PATTERNS = {
    "mean_kld": r"Mean\s+KLD:\s*([-\d.eE+]+)",
    "p99_kld": r"99\.0%\s+KLD:\s*([-\d.eE+]+)",
    "max_kld": r"Maximum KLD:\s*([-\d.eE+]+)",
    "same_top": r"Same top p:\s*([-\d.eE+]+)",
    "ppl": r"Mean PPL\(Q\)\s*:\s*([-\d.eE+]+)",
    "ref_ppl": r"Mean PPL\(base\)\s*:\s*([-\d.eE+]+)",
}


def parse_llama_perplexity(text: str) -> dict:
    out = {}
    for key, pattern in _PATTERNS.items():
        m = re.search(pattern, text)
        if m:
            out[key] = float(m.group(1)) / (100.0 if key == "same_top" else 1.0)
    return out


def _run(cmd: list[str], what: str) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=3600)
    if res.returncode != 0:
        tail = " | ".join((res.stdout + res.stderr).strip().splitlines()[-4:])
        raise MedtuneError(f"{what} failed ({res.returncode}): {tail}", hint="--debug shows the command")
    return res.stdout + res.stderr


def crosscheck(
    reference: str | Path,
    quant: str | Path,
    text_file: str | Path,
    n_ctx: int = 128,
    *,
    llama_cpp_dir=None,
    n_threads: int | None = None,
    workdir: str | Path | None = None,
) -> dict:
    """llama-perplexity --kl-divergence and our code on the same text and chunks: both sets of figures."""
    from medtune.core.errors import require
    from medtune.runtimes import tools
    from medtune.runtimes.llamacpp import threads

    binary = tools.require("llama-perplexity", llama_cpp_dir, purpose="the cross-check of the KL divergence")
    reference, quant = Path(reference), Path(quant)
    text = Path(text_file).read_text(encoding="utf-8")
    t = str(n_threads or threads())
    with tempfile.TemporaryDirectory(prefix=".medtune-kld-", dir=workdir) as tmp:
        base = str(Path(tmp) / "base.kld")
        common = ["-f", str(text_file), "-c", str(n_ctx), "-b", str(n_ctx), "-t", t, "--kl-divergence-base", base]
        base_pass = _run([str(binary), "-m", str(reference), *common], "llama-perplexity (reference pass)")
        theirs = parse_llama_perplexity(
            _run([str(binary), "-m", str(quant), *common, "--kl-divergence"], "llama-perplexity --kl-divergence")
        )
        m = re.search(r"Final estimate: PPL = ([\d.]+)", base_pass)
        if m:  # the reference pass's perplexity from its float logits (the KL pass rereads 16-bit log-probs)
            theirs["ref_ppl_exact"] = float(m.group(1))
    llama_cpp = require("llama_cpp", extra="test", purpose="tokenizing the text as llama-perplexity does")
    llm = llama_cpp.Llama(model_path=str(reference), vocab_only=True, verbose=False)
    try:
        ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        bos = llama_cpp.llama_vocab_bos(vocab) if llama_cpp.llama_vocab_get_add_bos(vocab) else None
    finally:
        llm.close()
    seqs = chunk_sequences(ids, n_ctx, bos)
    if len(seqs) < 2:
        raise BadInput(
            f"the text has {len(ids)} tokens; llama-perplexity needs at least {2 * n_ctx}",
            where=str(text_file),
            hint="a longer text, or a smaller -c",
        )
    ours = judge_quants(reference, [quant], seqs, max_positions=1 << 30, n_threads=n_threads, workdir=workdir).rows[0]
    return {
        "text": str(text_file),
        "n_ctx": n_ctx,
        "chunks": len(seqs),
        "positions": ours.positions,
        "llama_perplexity": theirs,
        "medtune": {k: getattr(ours, k) for k in ("mean_kld", "p99_kld", "max_kld", "same_top", "ppl", "ref_ppl")},
    }

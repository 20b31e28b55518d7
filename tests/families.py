"""Tiny model folders per chat-template family, for the export, prepare and runtime tests.

Each tokenizer is SmolLM2's byte-level BPE vocabulary (fixture `smollm2_dir`) re-pointed to the pre-tokenizer
and special tokens of the family it stands for, with the family's real chat template; the weights are random
(transformers, float32, values F16 holds exactly). `CASES` maps a case name to what it is built from and what an
export of it must show; `make_model(out, smollm2_dir, CASES[name])` builds one. No hub, no mocks.
"""

from __future__ import annotations

import json
from pathlib import Path

from medtune.export import pretok

# ---- real chat templates (as the model repos ship them, tool branches included) -------------------------
QWEN25_TEMPLATE = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n"
    '    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are '
    'provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}\n'
    '    {%- for tool in tools %}\n        {{- "\\n" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n'
    '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments '
    'within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": '
    '<args-json-object>}\\n</tool_call><|im_end|>\\n" }}\n{%- else %}\n'
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n{%- for message in messages %}\n"
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or '
    '(message.role == "assistant" and not message.tool_calls) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n"
    '            {{- \'\\n<tool_call>\\n{"name": "\' }}\n            {{- tool_call.name }}\n'
    '            {{- \'", "arguments": \' }}\n            {{- tool_call.arguments | tojson }}\n'
    "            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "tool" %}\n'
    '        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}\n'
    "            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n"
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
    "            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"
)

QWEN3_TEMPLATE = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0].role == 'system' %}\n"
    "        {{- messages[0].content + '\\n\\n' }}\n    {%- endif %}\n"
    '    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n<tools>" }}\n'
    '    {%- for tool in tools %}\n        {{- "\\n" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n'
    "    {{- \"\\n</tools><|im_end|>\\n\" }}\n{%- else %}\n    {%- if messages[0].role == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}\n    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}\n"
    "{%- for message in messages[::-1] %}\n    {%- set index = (messages|length - 1) - loop.index0 %}\n"
    '    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and '
    "not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}\n"
    "        {%- set ns.multi_step_tool = false %}\n        {%- set ns.last_query_index = index %}\n"
    "    {%- endif %}\n{%- endfor %}\n{%- for message in messages %}\n    {%- if message.content is string %}\n"
    "        {%- set content = message.content %}\n    {%- else %}\n        {%- set content = '' %}\n"
    "    {%- endif %}\n"
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}\n'
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
    '                {%- endif %}\n                {{- \'\\n<tool_call>\\n{"name": "\' }}\n'
    '                {{- tool_call.name }}\n                {{- \'", "arguments": \' }}\n'
    "                {{- tool_call.arguments | tojson }}\n                {{- '}\\n</tool_call>' }}\n"
    "            {%- endfor %}\n        {%- endif %}\n        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "tool" %}\n'
    '        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}\n'
    "            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- content }}\n        {{- '\\n</tool_response>' }}\n"
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
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
# The same template as DeepSeek first published it with the R1 distills (January 2025): its generation prompt is
# <｜Assistant｜> alone, so the model opens the think block itself; the version above (February 2025 on) writes it.
DEEPSEEK_R1_JAN_TEMPLATE = DEEPSEEK_R1_TEMPLATE.replace("{{'<｜Assistant｜><think>\\n'}}", "{{'<｜Assistant｜>'}}")
assert DEEPSEEK_R1_JAN_TEMPLATE != DEEPSEEK_R1_TEMPLATE

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim "
    "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Phi-3.5-mini-instruct (Phi-3-mini's later revisions likewise): role tags on their own line, empty system dropped,
# eos_token after a conversation rendered without a generation prompt.
PHI35_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
    "{{'<|system|>\\n' + message['content'] + '<|end|>\\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)
# Phi-4-mini-instruct: the same tags with no newlines, every role written as <|role|>, tools inside the system turn.
PHI4_MINI_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and "
    "message['tools'] is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + "
    "message['tools'] + '<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + "
    "message['content'] + '<|end|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)

# Gemma 3 (gemma-3-*-it, MedGemma, gemma-3-270m-it): the system text and a blank line open the first user turn;
# roles must alternate; the assistant is "model".
GEMMA3_TEMPLATE = (
    "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n    {%- endif -%}\n"
    '    {%- set loop_messages = messages[1:] -%}\n{%- else -%}\n    {%- set first_user_prefix = "" -%}\n'
    "    {%- set loop_messages = messages -%}\n{%- endif -%}\n{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    '        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}\n'
    "    {%- endif -%}\n    {%- if (message['role'] == 'assistant') -%}\n        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n        {%- set role = message['role'] -%}\n    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n        {%- endfor -%}\n    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n    {%- endif -%}\n    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n{%- if add_generation_prompt -%}\n    {{'<start_of_turn>model\n'}}\n{%- endif -%}\n"
)

# Llama-3.1-8B-Instruct: a system block first, always, with the knowledge cut-off and `date_string` (default
# "26 Jul 2024"); tools go into the first user message (or the system block), tool calls as JSON or builtin calls.
LLAMA31_TEMPLATE = (
    "{{- bos_token }}\n{%- if custom_tools is defined %}\n    {%- set tools = custom_tools %}\n{%- endif %}\n"
    "{%- if not tools_in_user_message is defined %}\n    {%- set tools_in_user_message = true %}\n{%- endif %}\n"
    '{%- if not date_string is defined %}\n    {%- set date_string = "26 Jul 2024" %}\n{%- endif %}\n'
    "{%- if not tools is defined %}\n    {%- set tools = none %}\n{%- endif %}\n\n"
    "{#- This block extracts the system message, so we can slot it into the right place. #}\n"
    "{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content']|trim %}\n"
    '    {%- set messages = messages[1:] %}\n{%- else %}\n    {%- set system_message = "" %}\n{%- endif %}\n\n'
    '{#- System message + builtin tools #}\n{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}\n'
    '{%- if builtin_tools is defined or tools is not none %}\n    {{- "Environment: ipython\\n" }}\n{%- endif %}\n'
    "{%- if builtin_tools is defined %}\n"
    '    {{- "Tools: " + builtin_tools | reject(\'equalto\', \'code_interpreter\') | join(", ") + "\\n\\n"}}\n'
    '{%- endif %}\n{{- "Cutting Knowledge Date: December 2023\\n" }}\n{{- "Today Date: " + date_string + "\\n\\n" }}\n'
    "{%- if tools is not none and not tools_in_user_message %}\n"
    '    {{- "You have access to the following functions. To call a function, please respond with JSON for a '
    'function call." }}\n'
    '    {{- \'Respond in the format {"name": function name, "parameters": dictionary of argument name and its '
    "value}.' }}\n"
    '    {{- "Do not use variables.\\n\\n" }}\n    {%- for t in tools %}\n        {{- t | tojson(indent=4) }}\n'
    '        {{- "\\n\\n" }}\n    {%- endfor %}\n{%- endif %}\n{{- system_message }}\n{{- "<|eot_id|>" }}\n\n'
    "{#- Custom tools are passed in a user message with some extra guidance #}\n"
    "{%- if tools_in_user_message and not tools is none %}\n"
    "    {#- Extract the first user message so we can plug it in here #}\n    {%- if messages | length != 0 %}\n"
    "        {%- set first_user_message = messages[0]['content']|trim %}\n        {%- set messages = messages[1:] %}\n"
    "    {%- else %}\n"
    '        {{- raise_exception("Cannot put tools in the first user message when there\'s no first user message!") }}\n'
    "{%- endif %}\n    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}\n"
    '    {{- "Given the following functions, please respond with a JSON for a function call " }}\n'
    '    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}\n'
    '    {{- \'Respond in the format {"name": function name, "parameters": dictionary of argument name and its '
    "value}.' }}\n"
    '    {{- "Do not use variables.\\n\\n" }}\n    {%- for t in tools %}\n        {{- t | tojson(indent=4) }}\n'
    '        {{- "\\n\\n" }}\n    {%- endfor %}\n    {{- first_user_message + "<|eot_id|>"}}\n{%- endif %}\n\n'
    "{%- for message in messages %}\n"
    "    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}\n"
    "        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + "
    "'<|eot_id|>' }}\n"
    "    {%- elif 'tool_calls' in message %}\n        {%- if not message.tool_calls|length == 1 %}\n"
    '            {{- raise_exception("This model only supports single tool-calls at once!") }}\n        {%- endif %}\n'
    "        {%- set tool_call = message.tool_calls[0].function %}\n"
    "        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}\n"
    "            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
    '            {{- "<|python_tag|>" + tool_call.name + ".call(" }}\n'
    "            {%- for arg_name, arg_val in tool_call.arguments | items %}\n"
    "                {{- arg_name + '=\"' + arg_val + '\"' }}\n                {%- if not loop.last %}\n"
    '                    {{- ", " }}\n                {%- endif %}\n                {%- endfor %}\n'
    '            {{- ")" }}\n        {%- else  %}\n'
    "            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
    "            {{- '{\"name\": \"' + tool_call.name + '\", ' }}\n            {{- '\"parameters\": ' }}\n"
    '            {{- tool_call.arguments | tojson }}\n            {{- "}" }}\n        {%- endif %}\n'
    "        {%- if builtin_tools is defined %}\n            {#- This means we're in ipython mode #}\n"
    '            {{- "<|eom_id|>" }}\n        {%- else %}\n            {{- "<|eot_id|>" }}\n        {%- endif %}\n'
    '    {%- elif message.role == "tool" or message.role == "ipython" %}\n'
    '        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}\n'
    "        {%- if message.content is mapping or message.content is iterable %}\n"
    "            {{- message.content | tojson }}\n        {%- else %}\n            {{- message.content }}\n"
    '        {%- endif %}\n        {{- "<|eot_id|>" }}\n    {%- endif %}\n{%- endfor %}\n'
    "{%- if add_generation_prompt %}\n    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n{%- endif %}\n"
)

# Llama-3.2-1B-Instruct (3.3 likewise): the 3.1 template with today's date (strftime_now) as the default and no
# builtin tools.
LLAMA32_TEMPLATE = (
    "{{- bos_token }}\n{%- if custom_tools is defined %}\n    {%- set tools = custom_tools %}\n{%- endif %}\n"
    "{%- if not tools_in_user_message is defined %}\n    {%- set tools_in_user_message = true %}\n{%- endif %}\n"
    "{%- if not date_string is defined %}\n    {%- if strftime_now is defined %}\n"
    '        {%- set date_string = strftime_now("%d %b %Y") %}\n    {%- else %}\n'
    '        {%- set date_string = "26 Jul 2024" %}\n    {%- endif %}\n{%- endif %}\n'
    "{%- if not tools is defined %}\n    {%- set tools = none %}\n{%- endif %}\n\n"
    "{#- This block extracts the system message, so we can slot it into the right place. #}\n"
    "{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content']|trim %}\n"
    '    {%- set messages = messages[1:] %}\n{%- else %}\n    {%- set system_message = "" %}\n{%- endif %}\n\n'
    '{#- System message #}\n{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}\n'
    '{%- if tools is not none %}\n    {{- "Environment: ipython\\n" }}\n{%- endif %}\n'
    '{{- "Cutting Knowledge Date: December 2023\\n" }}\n{{- "Today Date: " + date_string + "\\n\\n" }}\n'
    "{%- if tools is not none and not tools_in_user_message %}\n"
    '    {{- "You have access to the following functions. To call a function, please respond with JSON for a '
    'function call." }}\n'
    '    {{- \'Respond in the format {"name": function name, "parameters": dictionary of argument name and its '
    "value}.' }}\n"
    '    {{- "Do not use variables.\\n\\n" }}\n    {%- for t in tools %}\n        {{- t | tojson(indent=4) }}\n'
    '        {{- "\\n\\n" }}\n    {%- endfor %}\n{%- endif %}\n{{- system_message }}\n{{- "<|eot_id|>" }}\n\n'
    "{#- Custom tools are passed in a user message with some extra guidance #}\n"
    "{%- if tools_in_user_message and not tools is none %}\n"
    "    {#- Extract the first user message so we can plug it in here #}\n    {%- if messages | length != 0 %}\n"
    "        {%- set first_user_message = messages[0]['content']|trim %}\n        {%- set messages = messages[1:] %}\n"
    "    {%- else %}\n"
    '        {{- raise_exception("Cannot put tools in the first user message when there\'s no first user message!") }}\n'
    "{%- endif %}\n    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}\n"
    '    {{- "Given the following functions, please respond with a JSON for a function call " }}\n'
    '    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}\n'
    '    {{- \'Respond in the format {"name": function name, "parameters": dictionary of argument name and its '
    "value}.' }}\n"
    '    {{- "Do not use variables.\\n\\n" }}\n    {%- for t in tools %}\n        {{- t | tojson(indent=4) }}\n'
    '        {{- "\\n\\n" }}\n    {%- endfor %}\n    {{- first_user_message + "<|eot_id|>"}}\n{%- endif %}\n\n'
    "{%- for message in messages %}\n"
    "    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}\n"
    "        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + "
    "'<|eot_id|>' }}\n"
    "    {%- elif 'tool_calls' in message %}\n        {%- if not message.tool_calls|length == 1 %}\n"
    '            {{- raise_exception("This model only supports single tool-calls at once!") }}\n        {%- endif %}\n'
    "        {%- set tool_call = message.tool_calls[0].function %}\n"
    "        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
    "        {{- '{\"name\": \"' + tool_call.name + '\", ' }}\n        {{- '\"parameters\": ' }}\n"
    '        {{- tool_call.arguments | tojson }}\n        {{- "}" }}\n        {{- "<|eot_id|>" }}\n'
    '    {%- elif message.role == "tool" or message.role == "ipython" %}\n'
    '        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}\n'
    "        {%- if message.content is mapping or message.content is iterable %}\n"
    "            {{- message.content | tojson }}\n        {%- else %}\n            {{- message.content }}\n"
    '        {%- endif %}\n        {{- "<|eot_id|>" }}\n    {%- endif %}\n{%- endfor %}\n'
    "{%- if add_generation_prompt %}\n    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n{%- endif %}\n"
)

# Mistral-7B-Instruct-v0.3: a first system message is prepended to the LAST user message; roles after it must
# alternate user/assistant (tool calls and results aside) or the template raises; no generation prompt.
MISTRAL_V03_TEMPLATE = (
    '{%- if messages[0]["role"] == "system" %}\n    {%- set system_message = messages[0]["content"] %}\n'
    "    {%- set loop_messages = messages[1:] %}\n{%- else %}\n    {%- set loop_messages = messages %}\n{%- endif %}\n"
    "{%- if not tools is defined %}\n    {%- set tools = none %}\n{%- endif %}\n"
    '{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}\n\n'
    "{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}\n"
    "{%- set ns = namespace() %}\n{%- set ns.index = 0 %}\n{%- for message in loop_messages %}\n"
    '    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and '
    "message.tool_calls is not none)) %}\n"
    '        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}\n'
    '            {{- raise_exception("After the optional system message, conversation roles must alternate '
    'user/assistant/user/assistant/...") }}\n'
    "        {%- endif %}\n        {%- set ns.index = ns.index + 1 %}\n    {%- endif %}\n{%- endfor %}\n\n"
    "{{- bos_token }}\n{%- for message in loop_messages %}\n"
    '    {%- if message["role"] == "user" %}\n'
    "        {%- if tools is not none and (message == user_messages[-1]) %}\n"
    '            {{- "[AVAILABLE_TOOLS] [" }}\n            {%- for tool in tools %}\n'
    "                {%- set tool = tool.function %}\n"
    '                {{- \'{"type": "function", "function": {\' }}\n'
    '                {%- for key, val in tool.items() if key != "return" %}\n'
    "                    {%- if val is string %}\n"
    "                        {{- '\"' + key + '\": \"' + val + '\"' }}\n                    {%- else %}\n"
    "                        {{- '\"' + key + '\": ' + val|tojson }}\n                    {%- endif %}\n"
    '                    {%- if not loop.last %}\n                        {{- ", " }}\n'
    "                    {%- endif %}\n                {%- endfor %}\n"
    '                {{- "}}" }}\n                {%- if not loop.last %}\n                    {{- ", " }}\n'
    '                {%- else %}\n                    {{- "]" }}\n                {%- endif %}\n'
    '            {%- endfor %}\n            {{- "[/AVAILABLE_TOOLS]" }}\n            {%- endif %}\n'
    "        {%- if loop.last and system_message is defined %}\n"
    '            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}\n'
    '        {%- else %}\n            {{- "[INST] " + message["content"] + "[/INST]" }}\n        {%- endif %}\n'
    "    {%- elif message.tool_calls is defined and message.tool_calls is not none %}\n"
    '        {{- "[TOOL_CALLS] [" }}\n        {%- for tool_call in message.tool_calls %}\n'
    "            {%- set out = tool_call.function|tojson %}\n            {{- out[:-1] }}\n"
    "            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}\n"
    '                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}\n'
    "            {%- endif %}\n            {{- ', \"id\": \"' + tool_call.id + '\"}' }}\n"
    '            {%- if not loop.last %}\n                {{- ", " }}\n            {%- else %}\n'
    '                {{- "]" + eos_token }}\n            {%- endif %}\n        {%- endfor %}\n'
    '    {%- elif message["role"] == "assistant" %}\n        {{- " " + message["content"]|trim + eos_token}}\n'
    '    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}\n'
    "        {%- if message.content is defined and message.content.content is defined %}\n"
    "            {%- set content = message.content.content %}\n        {%- else %}\n"
    "            {%- set content = message.content %}\n        {%- endif %}\n"
    '        {{- \'[TOOL_RESULTS] {"content": \' + content|string + ", " }}\n'
    "        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}\n"
    '            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}\n'
    "        {%- endif %}\n        {{- '\"call_id\": \"' + message.tool_call_id + '\"}[/TOOL_RESULTS]' }}\n"
    '    {%- else %}\n        {{- raise_exception("Only user and assistant roles are supported, with the exception '
    'of an initial optional system message!") }}\n    {%- endif %}\n{%- endfor %}\n'
)

QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
DS_BOS, DS_EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"

# (text, special) added after SmolLM2's 49152 tokens; its own <|endoftext|> <|im_start|> <|im_end|> are ids 0-2.
QWEN_ADDED = [("<tool_call>", False), ("</tool_call>", False), ("<think>", False), ("</think>", False)]
DEEPSEEK_ADDED = [
    (DS_BOS, True),
    (DS_EOS, True),
    ("<｜User｜>", False),
    ("<｜Assistant｜>", False),
    ("<think>", False),
    ("</think>", False),
]
LLAMA3_ADDED = [
    ("<|begin_of_text|>", True),
    ("<|end_of_text|>", True),
    ("<|start_header_id|>", True),
    ("<|end_header_id|>", True),
    ("<|eot_id|>", True),
]

# Phi-3.5's own added tokens: the role tags and </s> absorb the whitespace after them (rstrip), so "<|user|>\n"
# is one token. llama.cpp does the same for a GGUF whose general.name says phi3 / phi-3 (and needs <unk> then).
PHI_ADDED = [
    ("<unk>", True),
    ("<s>", True),
    ("</s>", True, "rstrip"),
    ("<|assistant|>", True, "rstrip"),
    ("<|system|>", True, "rstrip"),
    ("<|end|>", True, "rstrip"),
    ("<|user|>", True, "rstrip"),
]

# the tokenizer settings and special ids Qwen2.5 and Qwen3 share
QWEN_TOK = {
    "tokenizer_class": "Qwen2Tokenizer",
    "bos_token": None,
    "eos_token": "<|im_end|>",
    "pad_token": "<|endoftext|>",
    "add_bos_token": False,
}
QWEN_IDS = {"bos": "<|endoftext|>", "eos": ["<|im_end|>", "<|endoftext|>"]}

CASES = {
    "qwen2.5": dict(
        model="Qwen2",
        tied=False,
        added=QWEN_ADDED,
        pre="qwen2",
        template=QWEN25_TEMPLATE,
        tok=QWEN_TOK,
        ids=QWEN_IDS,
        gguf_arch="qwen2",
        family="chatml",
        system=QWEN_SYSTEM,
        stops=["<|im_end|>", "<|im_start|>", "<|endoftext|>"],
    ),
    "qwen3": dict(
        model="Qwen3",
        tied=True,
        added=QWEN_ADDED,
        pre="qwen2",
        template=QWEN3_TEMPLATE,
        head_dim=32,
        tok=QWEN_TOK,
        ids=QWEN_IDS,
        gguf_arch="qwen3",
        family="qwen3",
        system=None,
        stops=["<|im_end|>", "<|im_start|>", "<|endoftext|>"],
    ),
    "deepseek-r1-qwen": dict(
        model="Qwen2",
        tied=False,
        added=DEEPSEEK_ADDED,
        pre="qwen2",
        template=DEEPSEEK_R1_TEMPLATE,
        post_bos=DS_BOS,
        tok={
            "tokenizer_class": "LlamaTokenizerFast",
            "bos_token": DS_BOS,
            "eos_token": DS_EOS,
            "pad_token": DS_EOS,
            "add_bos_token": True,
        },
        ids={"bos": DS_BOS, "eos": [DS_EOS]},
        gguf_arch="qwen2",
        family="deepseek-r1",
        system=None,
        stops=[DS_EOS, "<｜User｜>", "<｜Assistant｜>"],
    ),
    "llama3": dict(
        model="Llama",
        tied=False,
        added=LLAMA3_ADDED,
        pre="llama-bpe",
        template=LLAMA3_TEMPLATE,
        post_bos="<|begin_of_text|>",
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        tok={"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
        ids={"bos": "<|begin_of_text|>", "eos": ["<|end_of_text|>", "<|eot_id|>"]},
        gguf_arch="llama",
        family="llama3",
        system=None,
        stops=["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>"],
    ),
}
CASES["phi3"] = dict(
    model="Phi3",
    tied=False,
    added=PHI_ADDED,
    pre="gpt-2",
    template=PHI35_TEMPLATE,
    tok={"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "<|endoftext|>"},
    # Phi-3.5's generation_config also ends on <|assistant|>: medtune's GGUF marks two end tokens (eos, eot) for
    # llama.cpp, whose only other slot is eom; a third is left to the Modelfile's stops.
    ids={"bos": "<s>", "eos": ["<|end|>", "<|endoftext|>"]},
    gguf_arch="phi3",
    family="phi3",
    system=None,
    stops=["<|end|>", "<|user|>", "<|assistant|>", "<|endoftext|>"],
)
# Phi-4-mini: 3/4 of each head rotated, <|endoftext|> for both BOS and EOS, no token stripping spaces. Its tied
# embeddings are the ARCHS entry's (a tied random model this small repeats one token, which the greedy test refuses).
CASES["phi4-mini"] = {
    **CASES["phi3"],
    "added": [(text, special) for text, special, *_ in PHI_ADDED],
    "template": PHI4_MINI_TEMPLATE,
    "tok": {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"},
    "ids": {"bos": "<|endoftext|>", "eos": ["<|end|>", "<|endoftext|>"]},
    "config_extra": {"partial_rotary_factor": 0.75},
    "rope_dims": 12,
    "family": "phi4-mini",
}
CASES["deepseek-r1-jan-qwen"] = {
    **CASES["deepseek-r1-qwen"],
    "template": DEEPSEEK_R1_JAN_TEMPLATE,
    "family": "deepseek-r1-jan",
}
# Llama 3.1: the Llama 3 model and tokens with 3.1's template (its date default is medtune's fixed date).
CASES["llama3.1"] = {**CASES["llama3"], "template": LLAMA31_TEMPLATE, "family": "llama3.1"}
# Mistral v0.3 and Gemma 3: their chat templates and special tokens on the tiny Llama model (the template, not the
# architecture, is what these cases are about).
CASES["mistral"] = {
    **CASES["llama3"],
    "added": [("<s>", True), ("</s>", True), ("[INST]", True), ("[/INST]", True)],
    "template": MISTRAL_V03_TEMPLATE,
    "post_bos": "<s>",
    "rope_scaling": None,
    "tok": {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"},
    "ids": {"bos": "<s>", "eos": ["</s>"]},
    "family": "mistral",
    "stops": ["</s>", "[INST]", "[/INST]"],
}
CASES["gemma3"] = {
    **CASES["mistral"],
    "added": [("<bos>", True), ("<eos>", True), ("<start_of_turn>", True), ("<end_of_turn>", True)],
    "template": GEMMA3_TEMPLATE,
    "post_bos": "<bos>",
    "tok": {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>"},
    "ids": {"bos": "<bos>", "eos": ["<eos>", "<end_of_turn>"]},
    "family": "gemma3",
    "stops": ["<end_of_turn>", "<start_of_turn>", "<eos>"],
}

# ---- the architecture table: one entry per class in medtune.archs -----------------------------------------
# An entry gets export, GGUF import round trip, config normalisation and llama.cpp-load tests
# (tests/test_export_archs.py). case: the CASES entry whose tokenizer, template and shape the tiny model takes;
# model: the transformers class prefix when it is not the case's; gguf_arch: the general.architecture written;
# imports_as: the architecture a GGUF of it comes back as (default: itself).
ARCHS = {
    "LlamaForCausalLM": dict(case="llama3", model_type="llama", gguf_arch="llama"),
    "MistralForCausalLM": dict(
        case="llama3",
        model="Mistral",
        rope_scaling=None,
        model_type="mistral",
        gguf_arch="llama",
        imports_as="LlamaForCausalLM",
    ),
    "Qwen2ForCausalLM": dict(case="qwen2.5", model_type="qwen2", gguf_arch="qwen2"),
    "Qwen3ForCausalLM": dict(case="qwen3", model_type="qwen3", gguf_arch="qwen3"),
    "Phi3ForCausalLM": dict(case="phi4-mini", tied=True, model_type="phi3", gguf_arch="phi3"),
    # 3 layers, every 2nd global (one pattern period and a half), a window of 8 tokens (shorter than every test
    # prompt), head_dim 32 != 64 / 4 heads, linear rope scaling on the global layers (as Gemma 3 4B+). Untied:
    # a tied tiny random Gemma repeats one token (test_gemma3_tied_output_logits_equal_transformers ties it).
    "Gemma3ForCausalLM": dict(
        case="llama3",
        model="Gemma3",
        config_class="Gemma3TextConfig",
        tied=False,
        head_dim=32,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
        local_rope_theta=10000.0,
        config_extra={
            "num_hidden_layers": 3,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
            "sliding_window": 8,
            "query_pre_attn_scalar": 32,
            "hidden_activation": "gelu_pytorch_tanh",
        },
        model_type="gemma3_text",
        gguf_arch="gemma3",
        gelu_fp16=True,  # llama.cpp's CPU GELU goes through an F16 table: the logits test's reference does too
    ),
}

# Classes with tests of their own instead of the table's (the table builds text-only *ForCausalLM models): a
# Gemma3ForConditionalGeneration checkpoint (MedGemma) exports its language model only
# (tests/test_export_archs.py test_gemma3_multimodal_exports_its_language_model: names and keys;
# tests/test_gemma.py test_a_multimodal_gemma_checkpoint_exports_its_language_model: llama.cpp's logits).
ARCHS_UNIT_ONLY = {"Gemma3ForConditionalGeneration": "Gemma3ForCausalLM"}


def arch_case(hf_arch: str) -> dict:
    """The CASES entry an ARCHS entry builds its tiny model from, with the entry's overrides."""
    entry = ARCHS[hf_arch]
    keys = ("model", "rope_scaling", "tied", "head_dim", "config_class", "config_extra", "local_rope_theta")
    overrides = {k: v for k, v in entry.items() if k in keys}
    return {**CASES[entry["case"]], **overrides}


CHATS = [
    [{"role": "user", "content": "What is a normal resting heart rate for adults?"}],
    [
        {"role": "system", "content": "You are a careful clinician. Answer briefly."},
        {"role": "user", "content": "BP 150/95 mmHg on 3 visits, eGFR 58. Next step?"},
    ],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "发烧39度怎么办？请给三条建议。"},
    ],
    [
        {"role": "user", "content": "Is 38.5 C a fever?"},
        {"role": "assistant", "content": "<think>\nAdults: fever from 38.0 C.\n</think>\n\nYes, a mild one."},
        {"role": "user", "content": "Dose of ibuprofen 400mg x3/day, max 1200 mg? Reply in <tool_call> tags."},
    ],
]
TEXTS = [
    "12345 + 678 = 13023",
    "  two  spaces\tand tab\n\nnew lines",
    "糖尿病患者的饮食建议：少糖、多纤维。",
    "café 🩺 HbA1c 7.2%",
    "<think>\nreasoning\n</think>\n\nanswer<|im_end|>",
    "I'm sure it's 2.5mg/kg.",
]


# ---- building the models ---------------------------------------------------------------------------------
def write_tokenizer(out: Path, smollm2_dir: Path, case: dict) -> int:
    """tokenizer.json/tokenizer_config.json of the family on SmolLM2's vocabulary; returns the token count."""
    tok = json.loads((smollm2_dir / "tokenizer.json").read_text(encoding="utf-8"))
    tok["pre_tokenizer"] = pretok.REGISTRY[case["pre"]].hf
    tok["normalizer"] = {"type": "NFC"} if case["pre"] == "qwen2" else None
    n = len(tok["model"]["vocab"])
    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    for i, (text, special, *strip) in enumerate(case["added"]):  # strip: ("rstrip",) for a token eating spaces after
        ids[text] = n + i
        tok["added_tokens"].append(
            {
                "id": n + i,
                "content": text,
                "single_word": False,
                "lstrip": False,
                "rstrip": "rstrip" in strip,
                "normalized": False,
                "special": special,
            }
        )
    bos = case.get("post_bos")
    if bos:  # Llama 3 / DeepSeek: the post-processor puts BOS in front of every encoding
        single = [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}]
        tok["post_processor"] = {
            "type": "TemplateProcessing",
            "single": single,
            "pair": single + [{"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [ids[bos]], "tokens": [bos]}},
        }
    (out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    tcfg = {
        **case["tok"],
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "chat_template": case["template"],
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg, ensure_ascii=False), encoding="utf-8")
    gen = {"bos_token_id": ids[case["ids"]["bos"]], "eos_token_id": [ids[e] for e in case["ids"]["eos"]]}
    (out / "generation_config.json").write_text(json.dumps(gen))
    return n + len(case["added"])


def make_model(out: Path, smollm2_dir: Path, case: dict, seed: int = 0) -> Path:
    import torch
    import transformers

    from medtune.models.config import normalise_config

    out.mkdir(parents=True)
    n_tokens = write_tokenizer(out, smollm2_dir, case)
    gen = json.loads((out / "generation_config.json").read_text())
    tokenizer_files = {
        f: (out / f).read_bytes() for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
    }
    cfg = dict(
        vocab_size=-(-n_tokens // 64) * 64,  # padded, as Qwen pads: rows with no token
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        tie_word_embeddings=case["tied"],
        bos_token_id=gen["bos_token_id"],
        eos_token_id=gen["eos_token_id"][0],
    )
    rope = {"rope_type": "default", "rope_theta": 500000.0 if case["model"] == "Llama" else 1000000.0}
    if case.get("rope_scaling"):
        rope = {**rope, **case["rope_scaling"]}
    if case.get("head_dim"):
        cfg["head_dim"] = case["head_dim"]
    cfg.update(case.get("config_extra") or {})
    if case.get("local_rope_theta"):  # Gemma 3: rope parameters per layer type, the scaling on global layers
        rope = {
            "full_attention": rope,
            "sliding_attention": {"rope_type": "default", "rope_theta": case["local_rope_theta"]},
        }
    torch.manual_seed(seed)
    model_cls = getattr(transformers, f"{case['model']}ForCausalLM")
    config = getattr(transformers, case.get("config_class", f"{case['model']}Config"))(**cfg, rope_parameters=rope)
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


def ollama_view(messages, template):
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

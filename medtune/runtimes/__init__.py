"""The engines medtune runs models in, one module each, with the same small set of operations where the engine
allows them (`greedy(…, prompt_ids, max_tokens, penalty=, end_ids=) -> Greedy`, `token_logprobs(…, ids, start)`):

- `mlx`: MLX through mlx_lm, the engine training uses: load a model (+ adapter), stream answers (`medtune chat`,
  `medtune generate`, eval's MLX columns), greedy decoding and teacher-forced log-probs (fidelity, eval);
- `llamacpp`: llama.cpp in process through llama-cpp-python: `load_gguf`, greedy with the same penalty rule as MLX,
  log-probs of every position (eval's GGUF columns, fidelity, the KL divergence of quants), `threads()`;
- `llama_server`: llama-server, the engine inside current Ollama, as a process driven over HTTP (fidelity);
- `decoding`: what they share: the repeat-penalty rule and its Modelfile values, the greedy result, log-softmax;
- `tools`: finds llama.cpp's executables (llama-server, llama-perplexity, llama-quantize).

Heavy imports (mlx, mlx_lm, llama_cpp) happen inside the functions.
"""

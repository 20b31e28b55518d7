"""Is the tuned model better, and does the served file answer like it? `evaluate` (base vs tuned vs GGUF on held-out
data and probes, the report), `fidelity` (a GGUF against its HF model, in process or in llama-server), `quants`
(quantized files judged by KL divergence) and `report_html` (the self-contained HTML report)."""

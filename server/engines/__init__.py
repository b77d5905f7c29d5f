"""Engine adapters: each turns a chat prompt into a stream of text deltas.

``base`` holds the interface; ``simulated`` is a timing simulation for load
work without a GPU; ``vllm_local`` runs vLLM's AsyncLLM in-process; ``remote``
talks to a pool of OpenAI-compatible vLLM servers (``replicas``: the pool and
its routing, ``replica_health``: its health checks, ``chat_completions``: one
streamed completion). ``chat_template`` renders and counts prompts with the
model's tokenizer for both vLLM engines; ``latency`` keeps the recent-latency
medians every engine reports.
"""

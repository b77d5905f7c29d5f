"""Engine adapters: each turns a chat prompt into a stream of text deltas.

``base`` holds the interface; ``simulated`` is a timing simulation for load
work without a GPU; ``vllm_local`` runs vLLM's AsyncLLM in-process; ``remote``
talks to a pool of OpenAI-compatible vLLM servers.
"""

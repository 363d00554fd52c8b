"""Generation (KV cache, sampling), the continuous-batching engine and the OpenAI-compatible server."""

"""Interop with other frameworks: Hugging Face GPT-2 export and import (:mod:`.hf`), GGUF export for llama.cpp (:mod:`.gguf`)."""

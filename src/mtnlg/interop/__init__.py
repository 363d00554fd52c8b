"""Interop with other frameworks: Hugging Face GPT-2 export and import (:mod:`.hf`)."""

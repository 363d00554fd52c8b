"""Tokenizers, built-in corpora, preprocessing to memory-mapped token files, datasets and samplers."""

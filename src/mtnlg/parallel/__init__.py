"""Parallelism applied to a plain model from outside: mesh, tensor/sequence, pipeline, data parallel."""

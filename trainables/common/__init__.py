"""Shared pieces of the model families: data, metrics, kNN index, feature cache, loop helpers."""

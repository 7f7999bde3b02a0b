"""Measuring a model against its original: quality (evaluate), speed, memory and size
(benchmark), compiled decoding, and greedy generation."""

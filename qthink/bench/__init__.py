"""Benchmarks (`qthink bench`): inference against the published recipe, the training step, teacher
extraction, and the GPU bench; `seed_recipe` is that published recipe, kept verbatim as the reference."""

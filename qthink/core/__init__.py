"""Core: the latent loop, its KV cache and sampling, the QThink model (prompt layout, output decoding,
checkpoint I/O), version shims and the embedded tiny base. Everything else builds on these."""

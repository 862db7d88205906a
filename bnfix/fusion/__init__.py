"""Two-stage Fusion Tuning (FusT) for audio-visual models built from pretrained encoders.

Modules, one concept each: ``config`` (TOML + overrides), ``manifest`` (the CSV of samples),
``features`` (decoded features, computed once and cached), ``masking`` (per-sample mask ratios
and batched patch masks), ``model`` (encoders + fusion head), ``stages`` (stage 1 and stage 2
loops), ``run`` (out_dir, metrics, checkpoints, resume), ``distributed`` (torchrun / DDP).
"""

"""Hydra config groups (model, parallel, backend, data, trainer), shipped as package data of
``dist_attn.configs`` so an installed wheel trains without a checkout."""

"""The core: units, block discovery and the checkpoint wrapper, DeepSpeed config rules, torch/transformers compat,
plotting; no other package of lightning_memopt is imported here."""

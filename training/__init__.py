"""Training and evaluation of LoRA adapters and SAEs (the `lorasae` CLI)."""

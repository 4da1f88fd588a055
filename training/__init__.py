"""Training and evaluation of LoRA adapters and SAEs (the `lorasae` CLI)."""

if __name__ != "lorasae.training":  # e.g. `import training` from the repo root: a second copy of the code
    raise ImportError(
        f"import lorasae.training, not {__name__}: the training/ folder is installed as "
        "lorasae.training (pip install -e .)"
    )

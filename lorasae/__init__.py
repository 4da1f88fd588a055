"""lorasae core: model and SAE loading, splicing, corpus, metrics, adapter manifest."""

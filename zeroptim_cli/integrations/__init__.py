"""Recording from other libraries' training loops: ``integrations.hf`` for transformers' ``Trainer``,
``integrations.lightning`` for Lightning's (each imported by itself, as it needs its library)."""

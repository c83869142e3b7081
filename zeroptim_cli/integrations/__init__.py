"""Recording from other libraries' training loops: ``integrations.hf`` for transformers' ``Trainer`` (imported
by itself, as it needs transformers)."""

"""Training on the side: the ``Recorder`` for any training loop, ``zeroptim train``'s seeded loop,
optimizers (Lion, sign-SGD, normalized SGD, coordinate clipping) and the offline datasets."""

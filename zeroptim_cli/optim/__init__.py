"""Optimizers: the ones zeroptim trains with (``optimizers``, ``mezo``), and their saved state and the
step taken again from it (``state``), which both training (recording) and analysis (comparing
directions) need — hence a package below both."""

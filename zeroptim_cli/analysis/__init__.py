"""The analysis of a step: a pair's Taylor decomposition (``pair``), what it derives (``result``), the
opt-in extras, other directions, checkpoint files to results (``checkpoints``), sweeps over run folders,
and the description of checkpoints (``inspection``)."""

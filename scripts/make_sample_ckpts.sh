#!/usr/bin/env bash
# Re-create sample_ckpts/: the notebook's MLP on real MNIST digits, SGD (lr 0.1) and Adam (lr 1e-3),
# steps 100 and 101 recorded, so each run holds the pairs 100→101 and 101→102 with their batches.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf sample_ckpts/mlp_sgd sample_ckpts/mlp_adam
zeroptim train configs/mlp_sgd.yaml --quiet
zeroptim train configs/mlp_adam.yaml --quiet
du -sh sample_ckpts

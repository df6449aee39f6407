"""Pure-PyTorch references: the spec of every op (one module per op, named after it)."""

"""The label of positions without a target: the loss, the accuracy and every evaluation skip it (PyTorch's
`ignore_index` default, so HF-style label arrays carry over)."""

IGNORE_LABEL = -100

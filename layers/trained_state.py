"""Non-gradient state that training updates: a layer's running statistics (the Routing Transformer's k-means
centroids, layers/sparse_routing.py), saved with the parameters but never touched by the optimizer.

A layer holds a `TrainedBuffer` variable and, in training mode only, overwrites it during its parallel forward pass
(the convention of nnx.BatchNorm's running averages: the module attribute `use_running_average` is True by default
here, so decoding, evaluation and tests read the buffer as it is; `model.train()` sets it False). The training step
(train/train.py) puts the model in training mode, carries the buffers inside its parameter state (`SAVED`: what
checkpoints hold), gives them a zero update and no optimizer moments, and after the update replaces each buffer
with the value the forward pass wrote (averaged over the micro-batches of `train.grad_accum_steps`).

The forward pass must write a value that does not depend on the gradient (wrap it in stop_gradient), in float32:
the trainer does not cast buffers to the compute dtype.
"""

from flax import nnx


class TrainedBuffer(nnx.Variable):
    """State a layer's training-mode forward pass rewrites (no gradient); saved and restored with the parameters."""


# The variables a checkpoint's "params" item holds, and the filter to split a model with (nnx.split(model, SAVED,
# ...)) wherever a checkpoint is written or read: parameters and trained buffers.
SAVED = (nnx.Param, TrainedBuffer)

"""Softmax attention (MHA / GQA / MQA): `dot_product_attention` with `implementation=` dispatch, plus its oracle."""

from effarch.pallas_kernels.attention.api import dot_product_attention
from effarch.pallas_kernels.attention.reference import attention_reference

__all__ = ["attention_reference", "dot_product_attention"]

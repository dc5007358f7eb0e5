"""Flax NNX modules built on viva_tensor: attention that can be flash attention, quantized linear layers.

* :func:`exact_attention` is plain softmax attention (float32 statistics) with the signature and the
  mask semantics of ``jax.nn.dot_product_attention``; :func:`attention_function` turns a name
  (``"exact"``, ``"xla"``, ``"flash"``) or a callable into such a function, and :class:`SelfAttention`
  is a multi-head self-attention module that uses it (``nn/_attention.py``).
* :class:`QLinear` holds a quantized record (any format of :mod:`viva_tensor.quant`) as its kernel and
  computes with :func:`viva_tensor.quant.dot_general`; :func:`quantize_model` returns a copy of a model
  whose ``nnx.Linear`` layers are replaced by :class:`QLinear` ones, with the bytes before and after
  (``nn/_qlinear.py``). It is the one ``quantize_model`` of the package: every format of
  :func:`viva_tensor.quant.format_names`, and AWQ's calibration pass with
  ``quantize_model(model, "awq_int4", activations=capture_linear_inputs(model, x))`` (``nn/_awq.py``).
  ``quantize_model(model, fmt, method="gptq", calibration=batches)`` is calibrated, sequential GPTQ: each
  group of layers (those fed the same input) on the Hessian of the inputs that the already-quantized layers
  before it produce, captured by one jitted program per batch shape (``nn/_sequential.py``,
  :class:`CalibrationBatch` masks padding out).
* :func:`plan` measures each layer's sensitivity to each candidate format and picks a format per layer
  within a budget of bits per value (or the fewest bits to an error target); ``quantize_model(model, plan,
  method=...)`` applies the :class:`Plan` (``nn/_plan.py``).
* :class:`FakeQuantLinear` is an ``nnx.Linear`` whose kernel is fake-quantized on every call (quantization-aware
  training with a straight-through gradient); :func:`fake_quantize_model` swaps a model's ``nnx.Linear`` layers
  for them and :func:`freeze_fake_quant` turns the trained ones into :class:`QLinear` with the same bits
  (``nn/_qat.py``).
* :class:`QEmbed` holds an embedding table as a quantized record whose lookup decodes only the gathered
  rows (:func:`gather_rows`), with the tied projection ``attend``; :class:`QLinearGeneral`, :class:`QEinsum`
  and :class:`QConv` replace ``nnx.LinearGeneral``, ``nnx.Einsum`` and ``nnx.Conv``; :func:`quantizable` and
  :func:`quantize_layer` map each float layer to its quantized one (``nn/_qlayers.py``).
* :func:`lora` wraps a model's ``nnx.Linear`` / :class:`QLinear` layers with trainable low-rank adapters
  (:class:`LoRALinear`, parameters of kind :class:`LoRAParam`; QLoRA on a quantized base);
  :func:`merge_lora` folds them back, :func:`lora_state` / :func:`load_lora_state` move them alone
  (``nn/_lora.py``).

Layer paths are dotted (``"encoder.layer.0.query"``), as everywhere in viva_tensor.

Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from viva_tensor import nn
    >>> att = nn.SelfAttention(8, num_heads=2, rngs=nnx.Rngs(0))
    >>> att(jnp.ones((1, 3, 8))).shape
    (1, 3, 8)
"""

from viva_tensor.nn._attention import (
    ATTENTION_IMPLEMENTATIONS,
    SelfAttention,
    attention_function,
    dense_attention,
    exact_attention,
)
from viva_tensor.nn._awq import capture_linear_inputs
from viva_tensor.nn._lora import LoRALinear, LoRAParam, load_lora_state, lora, lora_filter, lora_state, merge_lora
from viva_tensor.nn._model import quantize_model
from viva_tensor.nn._plan import LayerChoice, Plan, plan
from viva_tensor.nn._qat import FakeQuantLinear, fake_quantize_model, freeze_fake_quant
from viva_tensor.nn._qlayers import (
    QConv,
    QEinsum,
    QEmbed,
    QLinearGeneral,
    gather_rows,
    quantizable,
    quantize_layer,
)
from viva_tensor.nn._qlinear import QLinear, QuantizeReport, param_bytes
from viva_tensor.nn._sequential import CalibrationBatch

__all__ = [
    "ATTENTION_IMPLEMENTATIONS",
    "exact_attention",
    "dense_attention",
    "attention_function",
    "SelfAttention",
    "QLinear",
    "QuantizeReport",
    "quantize_model",
    "capture_linear_inputs",
    "param_bytes",
    "FakeQuantLinear",
    "fake_quantize_model",
    "freeze_fake_quant",
    "CalibrationBatch",
    "plan",
    "Plan",
    "LayerChoice",
    "QEmbed",
    "QLinearGeneral",
    "QEinsum",
    "QConv",
    "gather_rows",
    "quantizable",
    "quantize_layer",
    "LoRAParam",
    "LoRALinear",
    "lora",
    "merge_lora",
    "lora_state",
    "lora_filter",
    "load_lora_state",
]

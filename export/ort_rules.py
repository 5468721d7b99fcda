"""Graph rewrites for ONNX Runtime's CPU kernels, beside onnxscript's own fusions.

torch exports ``group_norm`` as Reshape ``[N, G, -1]`` -> InstanceNormalization (unit
scale, zero bias) -> Reshape back -> per-channel Mul/Add. Both rewrites compute the same
thing with faster ONNX Runtime CPU kernels (the tiny TVP's 256 x 256 VAE norms: 4.0 ms
as exported, 2.6 ms per channel, 3.4 ms as LayerNormalization).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern


def _is_constant(value: ir.Value, expected: float) -> bool:
    return value.const_value is not None and bool(np.all(value.const_value.numpy() == expected))


def _static(value: ir.Value) -> tuple[int, ...] | None:
    shape = value.shape
    if shape is None or not all(isinstance(d, int) for d in shape):
        return None
    return tuple(shape)


class GroupNormPerChannel(pattern.RewriteRuleClassBase):
    """One channel per group: the whole chain is one InstanceNormalization on the
    unreshaped input with the channel affine as its scale and bias."""

    def pattern(self, op, x, grouped_shape, scale, bias, shape, gamma, beta):
        grouped = op.Reshape(x, grouped_shape, _allow_other_attributes=True)
        norm = op.InstanceNormalization(grouped, scale, bias, _allow_other_attributes=True, _outputs=["norm"])
        return op.Add(op.Mul(op.Reshape(norm, shape, _allow_other_attributes=True), gamma), beta)

    def check(self, context, x, scale, bias, shape, gamma, beta, norm, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        x_shape, grouped = _static(x), _static(norm)
        if x_shape is None or grouped is None or len(x_shape) < 3:
            return result.fail("shapes not static", x)
        if len(grouped) != 3 or grouped[1] != x_shape[1]:
            return result.fail("more than one channel per group", norm)
        if shape.const_value is None or tuple(shape.const_value.numpy()) != x_shape:
            return result.fail("the second Reshape does not restore the input shape", shape)
        if not (_is_constant(scale, 1.0) and _is_constant(bias, 0.0)):
            return result.fail("instance norm has its own affine", scale)
        per_channel = (x_shape[1],) + (1,) * (len(x_shape) - 2)
        for value in (gamma, beta):
            if value.const_value is None or value.const_value.numpy().shape[-len(per_channel):] != per_channel \
                    or value.const_value.numpy().size != x_shape[1]:
                return result.fail(f"{value.name} is not a constant per-channel vector", value)
        return result

    def rewrite(self, op, x, gamma, beta, norm, **_):
        epsilon = norm.producer().attributes.get_float("epsilon", 1e-5)
        flat = [op.Constant(value=ir.tensor(v.const_value.numpy().reshape(-1))) for v in (gamma, beta)]
        return op.InstanceNormalization(x, *flat, epsilon=epsilon)


class GroupNormAsLayerNorm(pattern.RewriteRuleClassBase):
    """Several channels per group: InstanceNormalization with unit scale and zero bias on
    ``[N, G, L]`` normalises each ``(n, g)`` row over ``L``, which is LayerNormalization
    over the last axis (one SIMD pass of row statistics in ONNX Runtime)."""

    def pattern(self, op, x, scale, bias):
        return op.InstanceNormalization(x, scale, bias, _allow_other_attributes=True, _outputs=["norm"])

    def check(self, context, x, scale, bias, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        shape = _static(x)
        if shape is None or len(shape) != 3:
            return result.fail("input is not a static [N, G, L]", x)
        if not (_is_constant(scale, 1.0) and _is_constant(bias, 0.0)):
            return result.fail("instance norm has its own affine", scale)
        return result

    def rewrite(self, op, x, norm, **_):
        epsilon = norm.producer().attributes.get_float("epsilon", 1e-5)
        ones = op.Constant(value=ir.tensor(np.ones(x.shape[-1], dtype=np.float32)))
        return op.LayerNormalization(x, ones, axis=-1, epsilon=epsilon)


def rewrite_group_norms(model: ir.Model) -> int:
    """Both rewrites, per channel first: a rule set would try both at every node, in graph
    order, and the LayerNormalization rule (rooted at the norm) would win every chain.
    Returns how many group norms were rewritten."""
    count = 0
    for rule in (GroupNormPerChannel.rule(), GroupNormAsLayerNorm.rule()):
        count += pattern.RewriteRuleSet([rule], commute=True).apply_to_model(model)
    return count

"""Exact graph rewrites for ONNX Runtime's CPU kernels, applied after onnxscript's ORT
fusions to the ``int8_cpu`` graphs. Each computes the same numbers with fewer or faster
kernels (times: 2 cores of this project's CI-class EPYC, ONNX Runtime 1.31).

Only rules whose worth shows in the whole ``int8_cpu`` predict step are kept
(``bench/ort_rules_bench.py``, docs/benchmarks.md): these four together are as fast as
the eight the module once had, and two fewer are measurably slower.

torch exports ``group_norm`` as Reshape ``[N, G, -1]`` -> InstanceNormalization (unit
scale, zero bias) -> Reshape back -> per-channel Mul/Add; a 2 x 32 x 256 x 256 one with
its SiLU takes 4.0 ms as exported, 2.6 ms per channel.
"""

from __future__ import annotations

from collections.abc import Collection

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
            array = value.const_value.numpy() if value.const_value is not None else None
            if array is None or array.size != x_shape[1] or array.shape[-len(per_channel):] != per_channel:
                return result.fail(f"{value.name} is not a constant per-channel vector", value)
        return result

    def rewrite(self, op, x, gamma, beta, norm, **_):
        epsilon = norm.producer().attributes.get_float("epsilon", 1e-5)
        flat = [op.Constant(value=ir.tensor(v.const_value.numpy().reshape(-1))) for v in (gamma, beta)]
        return op.InstanceNormalization(x, *flat, epsilon=epsilon)


class SkipLayerNormAsAddLayerNorm(pattern.RewriteRuleClassBase):
    """Undo onnxscript's ``SkipLayerNormalization`` fusion: ONNX Runtime 1.31's CPU kernel
    for it is slower than the Add and the LayerNormalization it replaces (on 2 cores:
    0.73 vs 0.26 ms at [2048, 4, 32], 7.0 vs 1.2 ms at [2048, 4, 320]; ONNX Runtime does
    not fuse them back). Applies where the node's mean and inverse-variance outputs are
    unused."""

    def pattern(self, op, x, skip, gamma, beta):
        out, _mean, _inv_std, total = op.SkipLayerNormalization(
            x, skip, gamma, beta, _domain="com.microsoft", _allow_other_inputs=True, _allow_other_attributes=True,
            _outputs=["out", "mean", "inv_std", "total"])
        return out, total

    def rewrite(self, op, x, skip, gamma, beta, out, **_):
        node = out.producer()
        bias = node.inputs[4] if len(node.inputs) > 4 else None
        total = op.Add(op.Add(x, bias), skip) if bias is not None else op.Add(x, skip)
        epsilon = node.attributes.get_float("epsilon", 1e-12)
        return op.LayerNormalization(total, gamma, beta, axis=-1, epsilon=epsilon), total


class PadInputChannels(pattern.RewriteRuleClassBase):
    """A convolution over fewer than 4 input channels (the VAE's first, on the RGB image)
    gets zero input channels up to 4: ONNX Runtime's U8S8 convolution runs 2.2x faster on
    4 channels than on 3 (1.0 vs 2.2 ms at 2 x 3 x 256 x 256 -> 32, 3 x 3), and a zero
    weight adds exactly nothing, in float and in int8 alike (a padded zero quantises to
    the zero point)."""

    CHANNELS = 4

    def pattern(self, op, x, weight):
        return op.Conv(x, weight, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["out"])

    def check(self, context, x, weight, out, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        w = weight.const_value
        if w is None or len(w.shape) < 3 or w.shape[1] >= self.CHANNELS:
            return result.fail("not a constant weight over fewer than 4 input channels", weight)
        if out.producer().attributes.get_int("group", 1) != 1:
            return result.fail("grouped convolution", out)
        return result

    def rewrite(self, op, x, weight, out, **_):
        conv = out.producer()
        w = weight.const_value.numpy()
        missing = self.CHANNELS - w.shape[1]
        pads = np.zeros(2 * w.ndim, dtype=np.int64)
        pads[w.ndim + 1] = missing  # end of the channel axis
        padded = op.Pad(x, op.Constant(value=ir.tensor(pads)), mode="constant")
        w = np.concatenate([w, np.zeros((w.shape[0], missing, *w.shape[2:]), w.dtype)], axis=1)
        padded_weight = op.Constant(value=ir.tensor(w), _outputs=[f"{weight.name}_padded"])
        result = op.Conv(padded, padded_weight, *conv.inputs[2:],
                         **{k: a.value for k, a in conv.attributes.items()})
        result.producer().name = conv.name  # INT8 exclusions go by node name
        return result


class AttentionForShortKeys(pattern.RewriteRuleClassBase):
    """MultiHeadAttention on separate Q, K, V (no bias, mask or cache) becomes ONNX's own
    Attention (opset 23) where there are fewer than 1024 keys. ONNX Runtime 1.31's CPU
    kernel for it is 20-35 % faster on short keys (on 2 cores: 1.06 vs 1.36 ms over 4
    frames at [2048, 4, 2 x 16]; 0.45 vs 0.69 ms for 1024 queries on 20 text tokens);
    MultiHeadAttention's flash path wins on long ones (8.96 vs 9.97 ms at [8, 1024, 2 x 16])."""

    MAX_KEYS = 1024
    OPSET = 23  # ONNX's Attention

    def pattern(self, op, q, k, v):
        return op.MultiHeadAttention(q, k, v, _domain="com.microsoft", _allow_other_attributes=True,
                                     _outputs=["out"])

    def check(self, context, q, k, v, out, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        node = out.producer()
        if node.graph is None or node.graph.opset_imports.get("", 0) < self.OPSET:
            return result.fail(f"the model's opset is below {self.OPSET}", node)
        shapes = [_static(t) for t in (q, k, v)]
        if any(s is None or len(s) != 3 for s in shapes):
            return result.fail("Q, K, V are not static [B, S, D]", q)
        if shapes[1][1] >= self.MAX_KEYS:
            return result.fail("long keys: MultiHeadAttention's flash path is faster", k)
        if node.attributes.get_int("unidirectional", 0):
            return result.fail("causal", node)
        return result

    def rewrite(self, op, q, k, v, out, **_):
        node = out.producer()
        heads = node.attributes.get_int("num_heads")
        scale = node.attributes.get_float("scale", 0.0)  # 0: MultiHeadAttention's 1/sqrt(head size)
        extra = {"scale": scale} if scale else {}
        return op.Attention(q, k, v, q_num_heads=heads, kv_num_heads=heads, **extra)


RULES: dict[str, type[pattern.RewriteRuleClassBase]] = {
    "group_norm_per_channel": GroupNormPerChannel,
    "skip_layer_norm_unfused": SkipLayerNormAsAddLayerNorm,
    "pad_input_channels": PadInputChannels,
    "attention_for_short_keys": AttentionForShortKeys,
}


def apply_rules(model: ir.Model, skip: Collection[str] = ()) -> dict[str, int]:
    """Every rule of :data:`RULES` but those named in ``skip`` (to measure what each one
    is worth: bench/ort_rules_bench.py) in turn, in place; how often each applied."""
    unknown = set(skip) - set(RULES)
    if unknown:
        raise ValueError(f"unknown rules {sorted(unknown)}; allowed: {list(RULES)}")
    return {name: pattern.RewriteRuleSet([rule.rule()], commute=True).apply_to_model(model)
            for name, rule in RULES.items() if name not in skip}

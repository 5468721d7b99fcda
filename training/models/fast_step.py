"""The whole predict step prepared for speed on a GPU: BF16 (or FP16) weights, channels-last
convolutions, SDPA attention (what the stages already call), torch.compile, and one CUDA
graph around the entire step so a call is a few input copies and a single replay with no
host synchronisation.

It only composes the policy's own stages (text -> TVP -> Former -> action head); no layer
is re-implemented. The action head (10 DDIM steps, <1 % of the FLOPs) stays in FP32: its
noise levels span 80 -> 0.002, where BF16's 8-bit mantissa would cost accuracy for nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .policy import VPPPolicy


@dataclass(frozen=True)
class FastStepOptions:
    dtype: torch.dtype = torch.bfloat16  # TVP, Former and text encoder weights/activations
    channels_last: bool = True
    compile: bool = True  # inductor kernels (its own CUDA graphs off: the whole step gets one)
    cuda_graph: bool = True  # only on CUDA devices
    warmup: int = 3


class FastPredictStep:
    """``step(frames, input_ids, attention_mask, tvp_noise, action_noise)`` -> de-normalised
    FP32 action chunk, like ``VPPPolicy.forward``.

    With a CUDA graph the returned tensor is a static buffer that the next call overwrites
    (clone it to keep it); inputs must keep the shapes of the first call.
    """

    def __init__(self, policy: VPPPolicy, options: FastStepOptions = FastStepOptions()):
        self.options = options
        self.policy = policy.eval()
        self.device = next(policy.parameters()).device
        low = options.dtype
        for module in (policy.text_encoder, policy.tvp, policy.former):
            module.to(dtype=low)
        if options.channels_last:  # NHWC convolutions: cuDNN follows the weights' layout
            for conv in policy.tvp.modules():
                if isinstance(conv, torch.nn.Conv2d):
                    conv.to(memory_format=torch.channels_last)
        self._fn = self._step
        if options.compile:
            self._fn = torch.compile(self._step, mode="max-autotune-no-cudagraphs", fullgraph=False)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static_in: tuple[torch.Tensor, ...] = ()
        self._static_out: torch.Tensor | None = None

    @property
    def uses_cuda_graph(self) -> bool:
        return self.options.cuda_graph and self.device.type == "cuda"

    def _step(self, frames: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              tvp_noise: torch.Tensor, action_noise: torch.Tensor) -> torch.Tensor:
        p, low = self.policy, self.options.dtype
        condition, goal = p.encode_text(input_ids, attention_mask)
        features = p.predictive_features(frames.to(low), condition, tvp_noise.to(low))
        tokens = p.former(features)
        actions = p.sample_actions(tokens.float(), goal.float(), action_noise.float())
        return p.denormalize(actions)

    @torch.inference_mode()
    def __call__(self, frames: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 tvp_noise: torch.Tensor, action_noise: torch.Tensor) -> torch.Tensor:
        inputs = (frames, input_ids, attention_mask, tvp_noise, action_noise)
        if not self.uses_cuda_graph:
            return self._fn(*inputs)
        if self._graph is None:
            self._capture(inputs)
        for static, value in zip(self._static_in, inputs):
            static.copy_(value, non_blocking=True)
        self._graph.replay()
        return self._static_out

    def _capture(self, inputs: tuple[torch.Tensor, ...]) -> None:
        """Warm up on a side stream (compilation, autotuning, allocator), then record the step."""
        self._static_in = tuple(t.to(self.device).clone() for t in inputs)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.options.warmup):
                self._fn(*self._static_in)
        torch.cuda.current_stream().wait_stream(side)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._static_out = self._fn(*self._static_in)

"""The whole predict step prepared for speed on a GPU: BF16 (or FP16) weights, channels-last
convolutions, SDPA attention (what the stages already call), torch.compile, and one CUDA
graph around the entire step so a call is a few input copies and a single replay with no
host synchronisation.

It only composes the policy's own stages (text -> TVP -> Former -> action head); no layer
is re-implemented. The action head (10 DDIM steps, <1 % of the FLOPs) stays in FP32 by
default: its noise levels span 80 -> 0.002. On an H200 that costs about 6 ms of a 27 ms
step (FP32 GEMMs without tensor cores, measured with bench/gpu_bench.py), so
``sampler_dtype`` can put it on tensor cores too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .policy import VPPPolicy

#: The stages of one predict step, in order (``predict_step`` marks the end of each).
STAGES = ("text", "tvp", "former", "action_head")


def predict_step(policy: VPPPolicy, dtype: torch.dtype, frames: torch.Tensor, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor, tvp_noise: torch.Tensor, action_noise: torch.Tensor,
                 mark: Callable[[str], None] | None = None, sampler_dtype: torch.dtype = torch.float32,
                 state: torch.Tensor | None = None) -> torch.Tensor:
    """``VPPPolicy.forward`` with text, TVP and Former in ``dtype`` and the sampler in
    ``sampler_dtype``; the chunk comes back de-normalised in FP32. ``state``: the normalised
    robot state [B, proprio_dim] of a policy with ``action_head.use_proprio`` (required there,
    as in ``forward``; the action head refuses a missing one).

    ``mark(stage)`` is called after each of :data:`STAGES` (a benchmark records a CUDA event
    there); with both dtypes FP32 this is exactly the policy's own forward.
    """
    condition, goal = policy.encode_text(input_ids, attention_mask)
    if mark:
        mark("text")
    features = policy.predictive_features(frames.to(dtype), condition, tvp_noise.to(dtype))
    if mark:
        mark("tvp")
    tokens = policy.former(features)
    if mark:
        mark("former")
    actions = policy.sample_actions(tokens.to(sampler_dtype), goal.to(sampler_dtype), action_noise.to(sampler_dtype),
                                    None if state is None else state.to(sampler_dtype))
    actions = policy.denormalize(actions.float())
    if mark:
        mark("action_head")
    return actions


@dataclass(frozen=True)
class FastStepOptions:
    dtype: torch.dtype = torch.bfloat16  # TVP, Former and text encoder weights/activations
    # The 10-step action sampler: FP32 by default (its noise levels span 80 -> 0.002); in
    # ``dtype`` it runs on tensor cores, as a TensorRT FP16 engine would.
    sampler_dtype: torch.dtype = torch.float32
    channels_last: bool = True
    compile: bool = True  # inductor kernels (its own CUDA graphs off: the whole step gets one)
    # "max-autotune-no-cudagraphs" also times Triton GEMM/conv templates: faster kernels,
    # but minutes more compilation at paper scale.
    compile_mode: str = "default"
    cuda_graph: bool = True  # only on CUDA devices
    # cuDNN times its convolution algorithms on the first call of each shape (a process-wide
    # switch: the step's shapes never change, so the search is paid once).
    cudnn_benchmark: bool = True
    warmup: int = 3


class FastPredictStep:
    """``step(frames, input_ids, attention_mask, tvp_noise, action_noise[, state])`` -> de-normalised
    FP32 action chunk, like ``VPPPolicy.forward`` (``state``: the normalised robot state of a
    policy that takes one, a graph input like the others).

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
        policy.action_head.to(dtype=options.sampler_dtype)
        if options.channels_last:
            # NHWC convolutions: cuDNN follows the weights' layout. The temporal (3, 1, 1)
            # convolutions see [B*F, C, H, W] activations permuted to [B, C, F, H, W]; with
            # channels-last 2-D activations that is already the channels-last 3-D layout.
            layouts = {torch.nn.Conv2d: torch.channels_last, torch.nn.Conv3d: torch.channels_last_3d}
            for conv in policy.tvp.modules():
                if type(conv) in layouts:
                    conv.to(memory_format=layouts[type(conv)])
        if options.cudnn_benchmark and self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self._fn = self._step
        if options.compile:
            self._fn = torch.compile(self._step, mode=options.compile_mode, fullgraph=False)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static_in: tuple[torch.Tensor, ...] = ()
        self._static_out: torch.Tensor | None = None

    @property
    def uses_cuda_graph(self) -> bool:
        return self.options.cuda_graph and self.device.type == "cuda"

    def _step(self, *inputs: torch.Tensor) -> torch.Tensor:
        state = inputs[5] if len(inputs) > 5 else None
        return predict_step(self.policy, self.options.dtype, *inputs[:5], sampler_dtype=self.options.sampler_dtype,
                            state=state)

    @torch.inference_mode()
    def __call__(self, frames: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 tvp_noise: torch.Tensor, action_noise: torch.Tensor,
                 state: torch.Tensor | None = None) -> torch.Tensor:
        inputs = (frames, input_ids, attention_mask, tvp_noise, action_noise, *(() if state is None else (state,)))
        if self._graph is not None and len(inputs) != len(self._static_in):
            raise ValueError("the captured step was recorded " + ("with" if len(self._static_in) > 5 else "without")
                             + " a state input; call it the same way")
        if not self.uses_cuda_graph:
            return self._fn(*inputs)
        if self._graph is None:
            self._capture(inputs)
        for static, value in zip(self._static_in, inputs):
            static.copy_(value, non_blocking=True)
        self._graph.replay()
        return self._static_out

    @torch.inference_mode()
    def run_uncaptured(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The same (compiled) kernels launched one by one, outside the graph: what a profiler
        can attribute kernel by kernel."""
        return self._fn(*inputs)

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

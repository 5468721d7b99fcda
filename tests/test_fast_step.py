"""The GPU predict step (BF16, channels-last, compile, one CUDA graph) computes what the
FP32 policy computes. The CUDA-graph half needs a GPU and skips without one."""

import copy

import pytest
import torch

from vpp_edge.training.models.fast_step import STAGES, FastPredictStep, FastStepOptions, predict_step

from .conftest import random_frames, tokens


def step_inputs(policy, tokenizer, preset, seed=0, device="cpu"):
    tvp_shape, action_shape = policy.noise_shapes(1)
    gen = torch.Generator().manual_seed(seed)
    x = (random_frames(preset, seed), *tokens(tokenizer), torch.randn(tvp_shape, generator=gen),
         torch.randn(action_shape, generator=gen))
    return tuple(t.to(device) for t in x)


def test_low_precision_step_matches_the_fp32_policy(tiny_policy, tiny_preset):
    policy, tok = tiny_policy
    x = step_inputs(policy, tok, tiny_preset)
    with torch.inference_mode():
        reference = policy(*x)
    fast = FastPredictStep(copy.deepcopy(policy), FastStepOptions(torch.bfloat16, compile=False))
    out = fast(*x)
    convs = [m for m in fast.policy.tvp.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.dtype == torch.bfloat16 for c in convs)
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    temporal = [m for m in fast.policy.tvp.modules() if isinstance(m, torch.nn.Conv3d)]
    assert temporal and all(c.weight.is_contiguous(memory_format=torch.channels_last_3d) for c in temporal)
    assert all(p.dtype == torch.float32 for p in fast.policy.action_head.parameters()), "sampler stays FP32"
    assert out.dtype == torch.float32 and out.shape == reference.shape
    cos = torch.nn.functional.cosine_similarity(out.flatten(), reference.flatten(), dim=0)
    assert cos > 0.999 and (out - reference).abs().max() < 0.05
    assert not fast.uses_cuda_graph


def test_fp32_step_is_the_policy_forward_and_marks_each_stage_once(tiny_policy, tiny_preset):
    policy, tok = tiny_policy
    x = step_inputs(policy, tok, tiny_preset)
    marks = []
    with torch.inference_mode():
        out = predict_step(policy, torch.float32, *x, mark=marks.append)
        assert torch.equal(out, policy(*x))
    assert tuple(marks) == STAGES


def test_sampler_in_fp16_runs_on_the_low_precision_weights(tiny_policy, tiny_preset):
    policy, tok = tiny_policy
    x = step_inputs(policy, tok, tiny_preset)
    with torch.inference_mode():
        reference = policy(*x)
    fast = FastPredictStep(copy.deepcopy(policy), FastStepOptions(torch.float16, sampler_dtype=torch.float16,
                                                                  compile=False, channels_last=False))
    out = fast(*x)
    assert all(p.dtype == torch.float16 for p in fast.policy.action_head.parameters())
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    cos = torch.nn.functional.cosine_similarity(out.flatten(), reference.flatten(), dim=0)
    assert cos > 0.999 and (out - reference).abs().max() < 0.05


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_replays_the_step_for_new_inputs(tiny_preset):
    from vpp_edge.training.models import build_policy

    policy, tok = build_policy(tiny_preset, seed=0, device="cuda")
    eager = FastPredictStep(copy.deepcopy(policy), FastStepOptions(compile=False, cuda_graph=False))
    graphed = FastPredictStep(policy, FastStepOptions(compile=False))
    a = step_inputs(policy, tok, tiny_preset, seed=0, device="cuda")
    b = step_inputs(policy, tok, tiny_preset, seed=1, device="cuda")
    out_a = graphed(*a).clone()
    out_b = graphed(*b).clone()
    assert graphed.uses_cuda_graph
    assert torch.allclose(out_a, eager(*a), atol=1e-3) and torch.allclose(out_b, eager(*b), atol=1e-3)
    assert not torch.allclose(out_a, out_b), "the replay reads the new inputs"


def test_a_state_taking_policy_gets_its_state_through_the_fast_step(tiny_preset):
    """action_head.use_proprio (official XBot): the normalised state is a step input like the
    others, reaches the sampler in its dtype, and a missing one is refused, not zero-filled."""
    from vpp_edge.training.models import build_policy

    preset = tiny_preset.replace(name="tiny_state", action_head={"use_proprio": True, "proprio_dim": 5})
    policy, tok = build_policy(preset, seed=0)
    with torch.no_grad():  # a random proprio_emb barely moves the context: make the state visible
        for p in policy.action_head.inner_model.proprio_emb.parameters():
            p.mul_(50)
    x = step_inputs(policy, tok, preset)
    states = [torch.full((1, 5), -0.8), torch.full((1, 5), 0.6)]
    with torch.inference_mode():
        references = [policy(*x, s) for s in states]
        assert torch.equal(predict_step(policy, torch.float32, *x, state=states[0]), references[0])
        with pytest.raises(ValueError, match="uses proprioception"):
            predict_step(policy, torch.float32, *x)
    assert (references[0] - references[1]).abs().max() > 1e-3, "the state reaches the actions"
    exact = FastPredictStep(copy.deepcopy(policy), FastStepOptions(torch.float32, compile=False))
    for state, reference in zip(states, references):  # FP32: each state's own chunk
        assert (exact(*x, state) - reference).abs().max() < 1e-4
    fast = FastPredictStep(copy.deepcopy(policy), FastStepOptions(torch.bfloat16, compile=False))
    out = fast(*x, states[0])
    cos = torch.nn.functional.cosine_similarity(out.flatten(), references[0].flatten(), dim=0)
    assert cos > 0.999 and (out - references[0]).abs().max() < 0.05
    with pytest.raises(ValueError, match="uses proprioception"):
        fast(*x)

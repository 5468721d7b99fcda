"""The model: shapes for every preset, determinism, and the behaviours that make it VPP."""

import pytest
import torch
from diffusers import EulerDiscreteScheduler

from vpp_edge.normalization import ActionNormalizer
from vpp_edge.presets import get_preset
from vpp_edge.training.models import build_policy
from vpp_edge.training.models.edm import ddim_step, exponential_sigmas, preconditioning
from vpp_edge.training.models.text import TextEncoder, build_random_clip, sincos_position_encoding
from vpp_edge.training.models.tvp import TVPFeatureExtractor

from .conftest import random_frames, tokens


def run(policy, tokenizer, frames, seed=0, text="pick up the red block"):
    ids, mask = tokens(tokenizer, text)
    noise = policy.make_noise(frames.shape[0], seed)
    with torch.inference_mode():
        return policy(frames, ids, mask, noise.tvp, noise.action)


def test_same_inputs_and_noise_give_bitwise_identical_actions(tiny_preset):
    a, tok_a = build_policy(tiny_preset, seed=0)
    b, tok_b = build_policy(tiny_preset, seed=0)
    frames = random_frames(tiny_preset)
    out1, out2, out3 = run(a, tok_a, frames), run(a, tok_a, frames), run(b, tok_b, frames)
    assert out1.shape == (1, tiny_preset.action_horizon, tiny_preset.action_dim) and out1.dtype == torch.float32
    assert torch.equal(out1, out2) and torch.equal(out1, out3)
    assert not torch.equal(out1, run(a, tok_a, frames, seed=1)), "other noise must give other actions"


def test_inputs_reach_the_features(tiny_policy, tiny_preset):
    policy, tok = tiny_policy
    ids, mask = tokens(tok)
    noise = policy.make_noise(1, 0)
    with torch.inference_mode():
        cond, goal = policy.encode_text(ids, mask)
        f1 = policy.predictive_features(random_frames(tiny_preset, 0), cond, noise.tvp)
        f2 = policy.predictive_features(random_frames(tiny_preset, 1), cond, noise.tvp)
        cond2, goal2 = policy.encode_text(*tokens(tok, "open the drawer"))
        f3 = policy.predictive_features(random_frames(tiny_preset, 0), cond2, noise.tvp)
    assert not torch.allclose(f1, f2) and not torch.allclose(f1, f3) and not torch.allclose(goal, goal2)


@pytest.mark.parametrize("name", ["calvin", "metaworld", "panda", "xhand", "xbot"])
def test_paper_presets_shapes_on_meta_device(name):
    """Full-size models (1.5B UNet) without allocating weights: every stage's shape."""
    p = get_preset(name)
    policy, _ = build_policy(p, device="meta")
    unet_params = sum(x.numel() for x in policy.tvp.unet.parameters())
    assert 1.4e9 < unet_params < 1.6e9  # SVD's UNet
    v, f = p.num_views, p.former.num_frames
    with torch.device("meta"), torch.no_grad():
        cond = torch.zeros(1, p.text.max_length, 2 * p.text.hidden_size)
        goal = torch.zeros(1, p.text.projection_dim)
        tvp_noise, act_noise = (torch.zeros(s) for s in policy.noise_shapes(1))
        feats = policy.predictive_features(torch.zeros(1, v, 3, 256, 256), cond, tvp_noise)
        toks = policy.former(feats)
        state = torch.zeros(1, p.action_head.proprio_dim) if p.action_head.use_proprio else None  # xbot
        actions = policy.denormalize(policy.sample_actions(toks, goal, act_noise, state))
    assert tvp_noise.shape == (1, v, p.tvp.num_frames, 4, 32, 32)
    channels = 2560 if p.tvp.use_all_layer else 1280  # up-blocks 0+1 (1280 + 1280), or 1, at 16x16
    assert feats.shape == (1, f, v * 16 * 16, channels)
    assert toks.shape == (1, f * p.former.queries_per_frame, 384)
    assert actions.shape == (1, p.action_horizon, p.action_dim)


def test_paper_width_text_tower():
    p = get_preset("calvin")
    clip = build_random_clip(p.text, vocab_size=300, eos_token_id=299)
    enc = TextEncoder(clip, position_encoding=True, max_length=20, goal_length=77).eval()
    ids = torch.randint(0, 298, (2, 77))
    ids[:, 0], ids[:, 7:] = 298, 299
    with torch.no_grad():
        cond, goal = enc(ids, (ids != 299).long() | (torch.arange(77) <= 7).long())
    assert cond.shape == (2, 20, 1024) and goal.shape == (2, 512)
    assert torch.equal(cond[..., :512], cond[..., 512:]), "condition = CLIP states duplicated to 1024-d"


def test_position_encoding_adds_the_sincos_table(tiny_policy):
    policy, tok = tiny_policy
    clip = policy.text_encoder.clip
    with_pe = TextEncoder(clip, position_encoding=True, max_length=20, goal_length=77)
    without = TextEncoder(clip, position_encoding=False, max_length=20, goal_length=77)
    ids, mask = tokens(tok)
    with torch.no_grad():
        (a, ga), (b, gb) = with_pe(ids, mask), without(ids, mask)
    table = sincos_position_encoding(20, clip.config.hidden_size)
    torch.testing.assert_close(a[0, :, : clip.config.hidden_size] - b[0, :, : clip.config.hidden_size], table)
    assert torch.equal(ga, gb), "the goal embedding has no position table"
    assert table[0, 0] == 0 and table[0, -1] == 1  # sin(0) first half, cos(0) second half
    with pytest.raises(ValueError, match="expected 77 tokens"):
        with_pe(ids[:, :10], mask[:, :10])


def test_goal_is_clips_projected_text_embedding(tiny_policy):
    policy, tok = tiny_policy
    ids, mask = tokens(tok)
    with torch.no_grad():
        _, goal = policy.encode_text(ids, mask)
        ref = policy.text_encoder.clip(input_ids=ids, attention_mask=mask).text_embeds
    assert torch.equal(goal, ref)


def test_truncated_unet_matches_diffusers_full_forward(tiny_policy, tiny_preset):
    """Our stop-after-up-block forward gives exactly what diffusers' own UNet computes there."""
    policy, _ = tiny_policy
    tvp = policy.tvp
    unet = tvp.unet
    n, frames = 2, tiny_preset.tvp.num_frames
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(n, frames, unet.config.in_channels, 32, 32, generator=gen)
    cond = torch.randn(n, 20, unet.config.cross_attention_dim, generator=gen)
    ids = tvp.added_time_ids.expand(n, -1)
    captured = {}
    hooks = [blk.register_forward_hook(lambda m, i, o, k=k: captured.__setitem__(k, o))
             for k, blk in enumerate(unet.up_blocks)]
    with torch.no_grad():
        unet(sample, tvp.timestep, cond, ids)
        ours = tvp.up_features(sample, cond, ids)
    for h in hooks:
        h.remove()
    last = tvp.extract_layer_idx
    c_last = captured[last].shape[1]
    assert torch.equal(ours[:, -c_last:], captured[last])
    earlier = torch.nn.functional.interpolate(captured[0], scale_factor=2 ** last)
    assert torch.equal(ours[:, : captured[0].shape[1]], earlier)
    assert ours.shape[1] == tvp.feature_channels


def test_temporal_cross_attention_projects_each_videos_context_once(tiny_policy):
    """The shared-context processor on the temporal cross-attentions projects one context
    per video (not one per spatial position) and gives diffusers' own processor's output
    and gradients, through the whole UNet as stage-1 training calls it."""
    import copy

    from diffusers.models.attention_processor import AttnProcessor2_0

    from vpp_edge.training.models.temporal_context import SharedContextAttnProcessor

    policy, _ = tiny_policy
    ours = copy.deepcopy(policy.tvp.unet)
    shared = {name: p for name, p in ours.attn_processors.items() if isinstance(p, SharedContextAttnProcessor)}
    assert shared and all("temporal_transformer_blocks" in n and n.endswith("attn2.processor") for n in shared)
    stock = copy.deepcopy(ours)
    stock.set_attn_processor(AttnProcessor2_0())

    n, frames = 2, policy.tvp.num_frames
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(n, frames, ours.config.in_channels, 32, 32, generator=gen)
    cond = torch.randn(n, 20, ours.config.cross_attention_dim, generator=gen)
    ids = policy.tvp.added_time_ids.expand(n, -1)
    key_rows = []
    first_key = ours.down_blocks[0].attentions[0].temporal_transformer_blocks[0].attn2.to_k
    hook = first_key.register_forward_hook(lambda m, i, o: key_rows.append(i[0].shape[0]))
    results = []
    for unet in (ours, stock):
        inputs = [sample.clone().requires_grad_(), cond.clone().requires_grad_()]
        out = unet(inputs[0], policy.tvp.timestep, inputs[1], ids).sample
        out.square().mean().backward()
        results.append((out.detach(), [x.grad for x in inputs], [w.grad for w in unet.parameters()]))
    hook.remove()
    assert key_rows == [n]  # one context per video: [n, L, C] projected, not [n * 32 * 32, L, C]
    (out_a, in_a, w_a), (out_b, in_b, w_b) = results
    assert torch.equal(out_a, out_b)
    for a, b in zip([*in_a, *w_a], [*in_b, *w_b]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("steps", [10, 20, 30])
def test_tvp_uses_the_schedulers_first_timestep(tiny_policy, tiny_preset, steps):
    policy, _ = tiny_policy
    cfg = tiny_preset.replace(tvp={"timesteps": steps}).tvp
    scheduler = EulerDiscreteScheduler.from_config(tiny_preset.scheduler_config())
    tvp = TVPFeatureExtractor(policy.tvp.unet, policy.tvp.vae, scheduler, cfg)
    ref = EulerDiscreteScheduler.from_config(tiny_preset.scheduler_config())
    ref.set_timesteps(steps)
    assert float(tvp.timestep) == pytest.approx(float(ref.timesteps[0]))
    sigma0 = float(ref.sigmas[0])
    assert float(tvp.noise_scale) == pytest.approx(float(ref.init_noise_sigma) / (sigma0**2 + 1) ** 0.5, rel=1e-6)


def test_video_former_is_invariant_to_token_order_within_a_frame(tiny_policy, tiny_preset):
    """Perceiver queries attend to a set: shuffling a frame's tokens changes nothing."""
    policy, _ = tiny_policy
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(1, tiny_preset.former.num_frames, 64, policy.former.condition_dim, generator=gen)
    perm = torch.randperm(64, generator=gen)
    with torch.no_grad():
        a, b = policy.former(feats), policy.former(feats[:, :, perm])
        c = policy.former(feats.flip(1))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a, c), "frame order matters (temporal position embedding)"
    with pytest.raises(ValueError, match="Video Former expects"):
        policy.former(feats[:, :1])


def test_decoder_attention_is_causal_over_actions_and_context(tiny_policy, tiny_preset):
    """As in the official model, action i attends to actions <= i and context tokens <= i."""
    policy, _ = tiny_policy
    head = policy.action_head.inner_model
    gen = torch.Generator().manual_seed(0)
    t, a = tiny_preset.action_horizon, tiny_preset.action_dim
    context = torch.randn(1, 1 + policy.former.num_tokens, tiny_preset.action_head.embed_dim, generator=gen)
    x = torch.randn(1, t, a, generator=gen)
    sigma = torch.tensor([1.0])
    j = 4
    ctx2 = context.clone()
    ctx2[:, j] += 1.0
    x2 = x.clone()
    x2[:, j] += 1.0
    with torch.no_grad():
        base, by_ctx, by_act = head.decode(context, x, sigma), head.decode(ctx2, x, sigma), head.decode(context, x2, sigma)
    assert torch.equal(base[:, :j], by_ctx[:, :j]) and not torch.allclose(base[:, j:], by_ctx[:, j:])
    assert torch.equal(base[:, :j], by_act[:, :j]) and not torch.allclose(base[:, j:], by_act[:, j:])


def test_edm_schedule_and_ddim_update():
    sig = exponential_sigmas(10, 0.001, 80.0)
    assert len(sig) == 11 and sig[-1] == 0
    assert float(sig[0]) == pytest.approx(80.0) and float(sig[-2]) == pytest.approx(0.001)
    ratios = sig[1:-1] / sig[:-2]
    torch.testing.assert_close(ratios, ratios[0].expand_as(ratios))  # log-linear
    x, d = torch.randn(3, 4), torch.randn(3, 4)
    assert torch.equal(ddim_step(x, d, 2.0, 0.0), d)
    # k-diffusion's DPM-Solver-1 form, as the official sampler writes it
    t, t_next = -torch.log(torch.tensor(2.0)), -torch.log(torch.tensor(0.5))
    official = (torch.exp(-t_next) / torch.exp(-t)) * x - torch.expm1(-(t_next - t)) * d
    torch.testing.assert_close(ddim_step(x, d, 2.0, 0.5), official)
    c_skip, c_out, c_in = preconditioning(torch.tensor(1e-6), 0.5)
    assert float(c_skip) == pytest.approx(1.0) and float(c_out) == pytest.approx(0.0, abs=1e-5)


def test_sampler_runs_the_configured_steps(tiny_policy, tiny_preset):
    policy, _ = tiny_policy
    head = policy.action_head
    calls = []
    handle = head.inner_model.action_pred.register_forward_hook(lambda *a: calls.append(1))
    toks = torch.randn(1, policy.former.num_tokens, tiny_preset.former.dim)
    with torch.no_grad():
        head.sample(toks, torch.randn(1, 32), torch.randn(1, tiny_preset.action_horizon, tiny_preset.action_dim))
    handle.remove()
    assert len(calls) == tiny_preset.action_head.num_steps
    with pytest.raises(ValueError, match="action noise must be"):
        head.sample(toks, torch.randn(1, 32), torch.randn(1, 3, 3))


def test_edm_loss_falls_when_fitting_one_batch(tiny_preset):
    policy, _ = build_policy(tiny_preset, seed=0)
    head = policy.action_head.train()
    gen = torch.Generator().manual_seed(0)
    toks = torch.randn(4, policy.former.num_tokens, tiny_preset.former.dim, generator=gen)
    goal = torch.randn(4, 32, generator=gen)
    actions = torch.rand(4, tiny_preset.action_horizon, tiny_preset.action_dim, generator=gen) * 2 - 1
    noise = torch.randn(actions.shape, generator=gen)
    sigma = torch.full((4,), 0.5)
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = head.loss(toks, goal, actions, noise, sigma)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_actions_are_denormalised_with_the_stored_statistics(tiny_preset):
    norm = ActionNormalizer(mode="bounds", low=tuple(range(-7, 0)), high=tuple(range(1, 8)))
    plain, tok = build_policy(tiny_preset, seed=0)
    scaled, _ = build_policy(tiny_preset, seed=0, normalizer=norm)
    frames = random_frames(tiny_preset)
    a, b = run(plain, tok, frames), run(scaled, tok, frames)
    torch.testing.assert_close(b, torch.from_numpy(norm.denormalize(a.numpy())))


def reduced_width(name: str):
    """A paper preset's shapes (views, frames, queries, actions) at tiny widths: runs for real."""
    tiny = get_preset("tiny")
    p = get_preset(name)
    return p.replace(text=tiny.text.__dict__, tvp={**tiny.tvp.__dict__, "num_frames": p.tvp.num_frames},
                     former={**tiny.former.__dict__, "num_frames": p.former.num_frames},
                     action_head={**tiny.action_head.__dict__, "proprio_dim": p.action_head.proprio_dim})


@pytest.mark.parametrize("name", ["calvin", "metaworld", "panda", "xhand"])
def test_paper_presets_at_reduced_width_predict_denormalised_float32_chunks(name):
    p = reduced_width(name)
    low = tuple(-1.0 - i for i in range(p.action_dim))
    norm = ActionNormalizer(mode="bounds", low=low, high=tuple(-x for x in low))
    policy, tok = build_policy(p, seed=0, normalizer=norm)
    frames = random_frames(p)
    ids, mask = tokens(tok)
    noise = policy.make_noise(1, 0)
    assert noise.tvp.shape == (1, p.num_views, p.tvp.num_frames, 4, 32, 32)
    with torch.inference_mode():
        cond, goal = policy.encode_text(ids, mask)
        feats = policy.predictive_features(frames, cond, noise.tvp)
        toks = policy.former(feats)
        normalised = policy.sample_actions(toks, goal, noise.action)
        actions = policy.denormalize(normalised)
    assert feats.shape == (1, p.former.num_frames, p.num_views * 16 * 16, policy.tvp.feature_channels)
    assert toks.shape == (1, p.num_queries, p.former.dim)
    assert actions.shape == (1, p.action_horizon, p.action_dim) and actions.dtype == torch.float32
    torch.testing.assert_close(actions, normalised * torch.tensor([-x for x in low]))  # bounds symmetric about 0
    assert torch.isfinite(actions).all()


def test_predictor_encodes_an_instruction_once(tiny_policy, tiny_preset):
    import numpy as np

    from vpp_edge.training.predict import TorchPredictor

    predictor = TorchPredictor(*tiny_policy)
    frames = np.zeros((2, 256, 256, 3), np.uint8)
    first = predictor.predict(frames, "open the drawer")
    again = predictor.predict(frames, "open the drawer")
    other = predictor.predict(frames, "close the drawer")
    assert first.timings_ms["text"] > 0 and again.timings_ms["text"] == 0 and other.timings_ms["text"] > 0
    np.testing.assert_array_equal(first.actions, again.actions)
    assert first.actions.shape == (tiny_preset.action_horizon, tiny_preset.action_dim)
    with pytest.raises(ValueError, match="expected uint8 frames"):
        predictor.predict(frames[:1], "open the drawer")


def test_proprio_state_is_the_last_encoder_token_as_official(tiny_preset):
    """use_proprio: the official forward_enc_only input [lang_emb(goal); tok_emb(tokens);
    proprio_emb(state_obs)] through the (non-causal) encoder; without it, no state token."""
    p = tiny_preset.replace(action_head={"use_proprio": True, "proprio_dim": 5})
    policy, _ = build_policy(p, seed=0)
    inner = policy.action_head.inner_model
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randn(1, p.num_queries, p.former.dim, generator=gen)
    goal = torch.randn(1, p.text.projection_dim, generator=gen)
    state = torch.rand(1, 5, generator=gen) * 2 - 1
    noise = torch.randn(1, p.action_horizon, p.action_dim, generator=gen)
    with torch.no_grad():
        context = inner.encode(tokens, goal, state)
        x = torch.cat([inner.lang_emb(goal[:, None]), inner.tok_emb(tokens), inner.proprio_emb(state[:, None])], 1)
        for block in inner.encoder.blocks:
            x = block(x)
        a, b = (policy.sample_actions(tokens, goal, noise, s) for s in (state, -state))
    assert context.shape == (1, 2 + p.num_queries, p.action_head.embed_dim)
    assert torch.equal(context, inner.encoder.ln(x))
    assert not torch.allclose(a, b), "the state reaches the actions through the encoder"
    with pytest.raises(ValueError, match=r"uses proprioception: pass the normalised state \[B, 5\], got none"):
        policy.sample_actions(tokens, goal, noise)
    plain, _ = build_policy(tiny_preset, seed=0)
    with pytest.raises(ValueError, match="does not use proprioception"):
        plain.sample_actions(tokens[..., : tiny_preset.former.dim], goal, noise, state[:, :1].expand(1, 8))

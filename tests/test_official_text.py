"""The text stage against the official VPP code's semantics (roboterax/video-prediction-policy).

Written here from the official definitions, independently of ``training/models/text.py``:

* goal (``policy_models/module/clip_lang_encoder.py``, ``clip.py``): ``clip.tokenize`` ->
  [SOT] + BPE + [EOT] zero-padded to 77, no attention mask; ``encode_text`` pools the final
  layer-normed state at ``argmax(tokens)`` (EOT, the highest id) and applies the projection;
* condition (``policy_models/module/diffusion_extract.py``): the transformers tokenizer with
  ``padding='max_length', truncation=True, max_length=20`` (BOS, 18 words, EOS; padded with
  EOS), then ``last_hidden_state`` (+ the sin-cos table with position encoding).

The CLIP here is a transformers ``CLIPTextModelWithProjection`` built in the test, over the
byte-level vocabulary of the tiny models (256 byte symbols, BOS 256, EOS 257).
"""

import warnings

import numpy as np
import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from vpp_edge.export import onnx_io
from vpp_edge.training.models.text import TextEncoder, sincos_position_encoding
from vpp_edge.tokenizer import InstructionTruncatedWarning, byte_level_tokenizer

BOS, EOS, CONTEXT, CONDITION = 256, 257, 77, 20
INSTRUCTIONS = {  # tokens with SOT/EOT -> instruction
    17: "open the drawer",
    20: "push the red block",
    26: "push the blue block left",
    50: "pick up the red block and place it in the drawer",
}


def byte_ids(text: str) -> list[int]:
    """[SOT] + byte-level BPE (GPT-2/CLIP ``bytes_to_unicode``, no merges) + [EOT]."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    symbol = {**{b: chr(b) for b in printable}, **{b: chr(256 + k) for k, b in enumerate(extra)}}
    vocab = {ch: i for i, ch in enumerate(sorted(symbol.values()))}
    return [BOS, *(vocab[symbol[b]] for b in text.lower().strip().encode()), EOS]


@torch.no_grad()
def official_goal(clip: CLIPTextModelWithProjection, text: str) -> torch.Tensor:
    ids = torch.zeros(1, CONTEXT, dtype=torch.long)
    tokens = byte_ids(text)
    ids[0, : len(tokens)] = torch.tensor(tokens)
    hidden = clip.text_model(input_ids=ids).last_hidden_state  # causal mask only, as OpenAI CLIP
    return clip.text_projection(hidden[torch.arange(1), ids.argmax(dim=-1)])


@torch.no_grad()
def official_condition(clip: CLIPTextModelWithProjection, text: str, position_encoding: bool) -> torch.Tensor:
    tokens = byte_ids(text)
    if len(tokens) > CONDITION:
        tokens = tokens[: CONDITION - 1] + [EOS]
    ids = torch.full((1, CONDITION), EOS, dtype=torch.long)
    mask = torch.zeros(1, CONDITION, dtype=torch.long)
    ids[0, : len(tokens)], mask[0, : len(tokens)] = torch.tensor(tokens), 1
    hidden = clip.text_model(input_ids=ids, attention_mask=mask).last_hidden_state
    if position_encoding:
        hidden = hidden + sincos_position_encoding(CONDITION, hidden.shape[-1])
    return torch.cat([hidden, hidden], dim=-1)


@pytest.fixture(scope="module")
def clip() -> CLIPTextModelWithProjection:
    torch.manual_seed(3)
    config = CLIPTextConfig(vocab_size=258, hidden_size=32, intermediate_size=64, projection_dim=24,
                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=CONTEXT,
                            eos_token_id=EOS, pad_token_id=EOS, bos_token_id=BOS)
    return CLIPTextModelWithProjection(config).eval()


def encode(encoder: TextEncoder, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    tok = byte_level_tokenizer(CONTEXT, CONDITION)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InstructionTruncatedWarning)
        ids, mask = (torch.from_numpy(a) for a in tok([text]))
    with torch.no_grad():
        return encoder(ids, mask)


@pytest.mark.parametrize("count", sorted(INSTRUCTIONS))
def test_goal_and_condition_equal_the_official_passes(clip, count):
    """Goal from all tokens (77-token pass), condition from the first 20, at any length."""
    text = INSTRUCTIONS[count]
    assert len(byte_ids(text)) == count
    encoder = TextEncoder(clip, position_encoding=True, max_length=CONDITION, goal_length=CONTEXT).eval()
    condition, goal = encode(encoder, text)
    assert (goal - official_goal(clip, text)).abs().max() < 1e-4
    assert (condition - official_condition(clip, text, position_encoding=True)).abs().max() < 1e-4


def test_exported_text_graph_equals_the_official_passes(clip, tmp_path):
    """The FP32 ONNX text graph (traced on one instruction) holds for long and short ones."""
    encoder = TextEncoder(clip, position_encoding=False, max_length=CONDITION, goal_length=CONTEXT).eval()
    tok = byte_level_tokenizer(CONTEXT, CONDITION)
    path = tmp_path / "text.onnx"
    onnx_io.export_onnx(encoder, tuple(torch.from_numpy(a) for a in tok(["open the drawer"])),
                        ("input_ids", "attention_mask"), ("condition", "goal"), path, opset=18)
    session = onnx_io.session(path)
    for text in INSTRUCTIONS.values():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InstructionTruncatedWarning)
            ids, mask = tok([text])
        condition, goal = session.run(None, {"input_ids": ids, "attention_mask": mask})
        assert np.abs(goal - official_goal(clip, text).numpy()).max() < 1e-4, text
        assert np.abs(condition - official_condition(clip, text, False).numpy()).max() < 1e-4, text


def test_truncation_warns_with_the_token_count_and_over_long_is_refused():
    tok = byte_level_tokenizer(CONTEXT, CONDITION)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids, mask = tok([INSTRUCTIONS[20]])  # fits: no warning
    assert mask.sum() == 20 and ids[0, 19] == EOS
    with pytest.warns(InstructionTruncatedWarning, match=r"instruction of 26 tokens .* truncated to 20 .* all 26"):
        ids, mask = tok([INSTRUCTIONS[26]])
    assert ids.shape == (1, CONTEXT) and mask.sum() == 26 and ids[0, 25] == EOS and (ids[0, 26:] == EOS).all()
    with pytest.raises(ValueError, match="instruction of 80 tokens .* too long for the 77-token CLIP context"):
        tok(["x" * 78])


def test_twenty_token_tokenizer_truncates_as_before():
    """Artifacts exported before the goal had its own pass take 20 ids: truncate, keep EOT, warn."""
    tok = byte_level_tokenizer(CONDITION)
    with pytest.warns(InstructionTruncatedWarning, match="instruction of 50 tokens .* the first 20 tokens"):
        ids, mask = tok([INSTRUCTIONS[50]])
    assert ids[0].tolist() == byte_ids(INSTRUCTIONS[50])[:19] + [EOS] and mask.all()


def test_official_release_layout_gives_the_official_goal(tiny_policy, tmp_path):
    """Official-layout files (SVD folder, CLIP folder, dp-*.pt) loaded by load_official without
    a preset: goal and actions equal those made with a CLIP loaded on its own from the folder."""
    from vpp_edge.training.checkpoints import load_official

    from .conftest import random_frames
    from .test_checkpoints import write_official

    video, clip_dir, action = write_official(*tiny_policy, tmp_path)
    policy, tok = load_official(None, video, clip_dir, action)
    assert policy.preset.name == "tiny"
    clip = CLIPTextModelWithProjection.from_pretrained(clip_dir).eval()
    frames, noise = random_frames(policy.preset), policy.make_noise(1, 0)
    for count in (17, 26):
        text = INSTRUCTIONS[count]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InstructionTruncatedWarning)
            ids, mask = (torch.from_numpy(a) for a in tok([text]))
        with torch.no_grad():
            _, goal = policy.encode_text(ids, mask)
            actions = policy(frames, ids, mask, noise.tvp, noise.action)
            condition = official_condition(clip, text, policy.preset.text.position_encoding)
            tokens = policy.former(policy.predictive_features(frames, condition, noise.tvp))
            ref = policy.denormalize(policy.sample_actions(tokens, official_goal(clip, text), noise.action))
        assert (goal - official_goal(clip, text)).abs().max() < 1e-4
        assert (actions - ref).abs().max() < 1e-4

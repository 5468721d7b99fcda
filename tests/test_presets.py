from pathlib import Path

import pytest
import yaml

from vpp_edge.errors import PresetError
from vpp_edge.presets import available_presets, get_preset, preset_from_dict
from vpp_edge.robot_description import parse_state_layout, read_robot_description


def test_shipped_presets_match_the_paper_settings():
    assert set(available_presets()) == {"calvin", "metaworld", "panda", "xhand", "xbot", "tiny", "metaworld_tiny"}
    expected = {  # name: (frames, horizon, action_dim, views)
        "calvin": (16, 10, 7, 2),
        "metaworld": (8, 4, 4, 2),
        "panda": (16, 10, 7, 2),
        "xhand": (16, 8, 18, 3),
        "xbot": (16, 8, 38, 3),
    }
    for name, (frames, horizon, dim, views) in expected.items():
        p = get_preset(name)
        assert (p.tvp.num_frames, p.action_horizon, p.action_dim, p.num_views) == (frames, horizon, dim, views)
        assert p.action_head.embed_dim == 384 and p.action_head.n_enc_layers == p.action_head.n_dec_layers == 4
        assert p.action_head.num_steps == 10 and p.action_head.sigma_data == 0.5
        assert p.action_head.sigma_min == 0.001 and p.action_head.sigma_max == 80
        assert p.unet_config()["cross_attention_dim"] == 1024
    assert get_preset("calvin").num_queries == 224  # the official num_latents
    # The CPU MetaWorld model keeps the paper preset's frames, actions and views; widths and
    # resolution shrink, and two measured choices differ (the preset's comment): a longer chunk
    # and the hand state, which the metaworld robot's description hands the policy.
    small, paper = get_preset("metaworld_tiny"), get_preset("metaworld")
    assert (small.tvp.num_frames, small.action_dim, small.num_views) == (paper.tvp.num_frames, paper.action_dim, 2)
    assert small.views == paper.views and small.image_size < paper.image_size
    assert small.action_horizon == 2 * paper.action_horizon and not paper.action_head.use_proprio
    robot, _ = read_robot_description("metaworld", ValueError)
    layout = parse_state_layout(robot["runtime"]["policy_state"])
    assert layout == (("ee_pose", slice(0, 4)),), "tcp xyz + finger opening, as the demonstrations record"
    assert small.action_head.use_proprio and small.action_head.proprio_dim == 4


OFFICIAL_CONFIGS = Path(__file__).with_name("data") / "official_vpp_configs.yaml"


@pytest.mark.parametrize("name", ["calvin", "xhand", "xbot"])
def test_presets_mirror_the_official_configs_field_by_field(name):
    """Each official config's model fields (tests/data, copied from policy_conf/) -> the preset."""
    data = yaml.safe_load(OFFICIAL_CONFIGS.read_text())
    config = data["configs"][name]
    m = {**data["defaults"], **config["model"]}
    p = get_preset(name)
    header = (Path(__file__).parents[1] / "vpp_edge" / "presets" / f"{name}.yaml").read_text().splitlines()[0]
    assert "policy_conf/VPP_" in header, "the preset file names the official config it mirrors"
    mirrored = {
        "action_horizon": (p.action_horizon, config["act_seq_len"]),
        "act_window_size": (p.action_horizon, m["act_window_size"]),
        "action_dim": (p.action_dim, m["action_dim"]),
        "proprio_dim": (p.action_head.proprio_dim, m["proprio_dim"]),
        "latent_dim": (p.former.dim, m["latent_dim"]),
        "Former_depth": (p.former.depth, m["Former_depth"]),
        "Former_heads": (p.former.heads, m["Former_heads"]),
        "Former_dim_head": (p.former.dim_head, m["Former_dim_head"]),
        "Former_num_time_embeds": (p.former.num_frames, m["Former_num_time_embeds"]),
        "num_latents": (p.num_queries, m["num_latents"]),
        "use_position_encoding": (p.text.position_encoding, m["use_position_encoding"]),
        "max_length": (p.text.max_length, m["max_length"]),
        "use_all_layer": (p.tvp.use_all_layer, m["use_all_layer"]),
        "extract_layer_idx": (p.tvp.extract_layer_idx, m["extract_layer_idx"]),
        "timestep": (p.tvp.timesteps, m["timestep"]),
        "num_sampling_steps": (p.action_head.num_steps, m["num_sampling_steps"]),
        "sampler_type": (p.action_head.sampler, m["sampler_type"]),
        "sigma_data": (p.action_head.sigma_data, m["sigma_data"]),
        "sigma_min": (p.action_head.sigma_min, m["sigma_min"]),
        "sigma_max": (p.action_head.sigma_max, m["sigma_max"]),
    }
    wrong = {k: v for k, v in mirrored.items() if v[0] != v[1]}
    assert not wrong, f"preset '{name}' differs from the official config at (preset, official): {wrong}"
    assert p.text.goal_length == 77  # clip.tokenize's context (the official goal pass)
    # The robot state reaches the action head exactly where the official policy class feeds state_obs.
    assert p.action_head.use_proprio == config["uses_state_obs"], "use_proprio mirrors the official state_obs use"
    # The commands are the actions plus the state exactly where the official deployment adds it.
    assert p.action_base == config.get("action_base", "none"), "action_base mirrors the official deployment"
    assert "use_Former" not in m or m["use_Former"] == "3d"


def test_unknown_preset_suggests_closest():
    with pytest.raises(PresetError, match="did you mean 'calvin'"):
        get_preset("calvn")


def test_preset_file_round_trip(tmp_path):
    p = get_preset("tiny")
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(p.to_dict()))
    assert get_preset(str(path)) == p


@pytest.mark.parametrize(
    "change, message",
    [
        ({"bogus": 1}, "unknown key"),
        ({"former": {"depth": 2, "colour": "red"}}, "unknown key.*'former'"),
        ({"tvp": {"extract_layer_idx": 3}}, "extract_layer_idx must be in"),
        ({"views": []}, "at least one camera"),
        ({"views": ["a", "a"]}, "unique"),
        ({"action_dim": 0}, "'action_dim' must be positive"),
        ({"image_size": 250}, "multiple of 8"),
        ({"former": {"num_frames": 32}}, "cannot exceed"),
        ({"text": {"hidden_size": 64}}, "cross_attention_dim"),
        ({"action_head": {"sampler": "heun"}}, "not supported"),
    ],
)
def test_invalid_presets_are_rejected_with_reason(change, message):
    data = get_preset("tiny").to_dict()
    for key, value in change.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) else value
    with pytest.raises(PresetError, match=message):
        preset_from_dict(data)


def test_missing_required_keys_and_bad_files(tmp_path):
    with pytest.raises(PresetError, match="missing required"):
        preset_from_dict({"name": "x"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(PresetError, match="not valid YAML"):
        get_preset(str(bad))
    with pytest.raises(PresetError, match="not found"):
        get_preset(str(tmp_path / "absent.yaml"))


def test_replace_merges_sections():
    p = get_preset("tiny").replace(former={"depth": 3}, action_horizon=5)
    assert p.former.depth == 3 and p.former.dim == get_preset("tiny").former.dim and p.action_horizon == 5


@pytest.mark.parametrize("name", ["metaworld", "panda"])
def test_presets_without_an_official_config_keep_the_shared_official_architecture(name):
    """The official repository has configs for CALVIN, XHand and XBot only: MetaWorld and Panda
    keep every field those three agree on (read from the copies, not restated), and the file
    says what it mirrors and what is its own."""
    data = yaml.safe_load(OFFICIAL_CONFIGS.read_text())
    models = [{**data["defaults"], **c["model"]} for c in data["configs"].values()]
    shared = {k: models[0][k] for k in models[0] if all(k in m and m[k] == models[0][k] for m in models)}
    p = get_preset(name)
    ours = {
        "latent_dim": p.former.dim, "Former_depth": p.former.depth, "Former_heads": p.former.heads,
        "Former_dim_head": p.former.dim_head, "extract_layer_idx": p.tvp.extract_layer_idx, "timestep": p.tvp.timesteps,
        "sampler_type": p.action_head.sampler, "num_sampling_steps": p.action_head.num_steps,
        "sigma_data": p.action_head.sigma_data, "sigma_min": p.action_head.sigma_min,
        "sigma_max": p.action_head.sigma_max,
    }
    assert set(ours) <= set(shared), f"the official configs disagree on {sorted(set(ours) - set(shared))}"
    wrong = {k: (v, shared[k]) for k, v in ours.items() if v != shared[k]}
    assert not wrong, f"preset '{name}' differs from the shared official architecture at (preset, official): {wrong}"
    per_frame = {m["num_latents"] // m["Former_num_time_embeds"] for m in models}
    assert per_frame == {p.former.queries_per_frame}, "latents per predicted frame as every official config"
    assert not p.action_head.use_proprio and p.text.goal_length == 77
    header = (Path(__file__).parents[1] / "vpp_edge" / "presets" / f"{name}.yaml").read_text()
    assert "Mirrors the architecture that every official config shares" in header
    assert "has no" in header and "config" in header  # says what is its own
    if name == "panda":  # the CALVIN robot's shapes: CALVIN weights load into it
        calvin = get_preset("calvin")
        assert (p.action_dim, p.action_horizon, p.num_views, p.tvp.use_all_layer, p.text) == \
            (calvin.action_dim, calvin.action_horizon, calvin.num_views, calvin.tvp.use_all_layer, calvin.text)

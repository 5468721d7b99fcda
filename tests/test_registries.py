"""Extension points are registries (issue 21): a new camera kind, smoothing policy, robot driver
or engine backend is one definition plus its registration, shown here with small examples; a
new robot on a shipped driver is its description alone.
Robot side: no torch (runs under make test-robot)."""

from types import SimpleNamespace

import numpy as np
import pytest

from vpp_edge.errors import ConfigError
from vpp_edge.registry import Registry


def test_a_registry_finds_registers_and_refuses():
    reg = Registry("widget", {"builtin": "vpp_edge.errors"})  # a built-in is a module imported on first use
    assert reg.names() == ["builtin"] and "builtin" in reg

    @reg.register("round", sides=0)
    def round_widget():
        return "round"

    assert reg.get("round")() == "round" and reg.info("round") == {"sides": 0}
    assert list(reg) == ["builtin", "round"]
    with pytest.raises(ConfigError, match=r"unknown widget 'rond' \(did you mean 'round'\?\); allowed: builtin, round"):
        reg.get("rond")
    with pytest.raises(ValueError, match="registered already"):
        reg.register("round")(lambda: "another")
    with pytest.raises(ConfigError, match="unknown widget 'builtin'"):  # its module did not register it
        reg.get("builtin")


class SolidCamera:
    """A camera kind in a few lines: every view one solid grey level (``solid:LEVEL,LEVEL``)."""

    def __init__(self, level: int, size: int):
        self.level, self.size = level, size


def test_a_new_camera_kind_is_one_builder_and_its_registration(demo_episode):
    from vpp_edge.runtime.cameras.factory import CAMERAS, CameraRequest, devices_by_view, make_cameras

    @CAMERAS.register("solid")
    def solid(req: CameraRequest):
        return [SolidCamera(int(level), req.size) for level in req.devices()]

    try:
        assert "solid" in CAMERAS.names()
        # Devices bound by the preset's view names, not by position.
        spec = "solid:" + devices_by_view({"gripper": 200, "static": 10}, ["static", "gripper"])
        cams = make_cameras(spec, 2, 32)
        assert [(c.level, c.size) for c in cams] == [(10, 32), (200, 32)]
        with pytest.raises(ConfigError, match="lists 1 device.*takes 2 view"):
            make_cameras("solid:5", 2, 32)
        with pytest.raises(ConfigError, match=r"by name.*unknown \['wrist'\]"):
            devices_by_view({"static": 1, "wrist": 2}, ["static", "gripper"])
    finally:
        CAMERAS.unregister("solid")
    with pytest.raises(ConfigError, match="unknown camera source 'solid'"):
        make_cameras("solid:1,2", 2, 32)


def test_the_built_in_camera_kinds_are_registered_in_their_modules(demo_episode):
    from vpp_edge.episodes import load_episode
    from vpp_edge.runtime.cameras.factory import CAMERAS, make_cameras
    from vpp_edge.runtime.cameras.replay import ReplayCameras

    assert CAMERAS.names() == ["replay", "replay-dali", "v4l2", "dali", "gstreamer", "auto", "zmq"]
    (cam,) = make_cameras("replay", 2, 32, load_episode(demo_episode))
    assert isinstance(cam, ReplayCameras)


def test_a_new_smoothing_policy_is_one_class_and_its_registration():
    from vpp_edge.runtime.chunking import SMOOTHING, ActionPlan, SmoothingPolicy

    @SMOOTHING.register("average")
    class Average(SmoothingPolicy):
        """Where chunks overlap, the plain mean of the old and the new action."""

        def merge(self, votes, current, new, overlap):
            return [(current + new) / 2]

    try:
        plan = ActionPlan(0.1, smoothing="average")
        plan.add_chunk(np.zeros((4, 1)), obs_stamp=0.0, now=0.0, seq=0)
        plan.add_chunk(np.ones((4, 1)), obs_stamp=0.1, now=0.1, seq=1)
        assert [float(plan.pop(round(0.1 * k, 6))[0]) for k in range(1, 5)] == [0.5, 0.5, 0.5, 1.0]
    finally:
        SMOOTHING.unregister("average")
    with pytest.raises(ValueError, match="smoothing 'average' unknown"):
        ActionPlan(0.1, smoothing="average")
    assert SMOOTHING.names() == ["none", "ensemble", "crossfade", "rtc"]
    assert [SMOOTHING.get(n).inpaints for n in SMOOTHING] == [False, False, False, True]


def _description(tmp_path, base: str, **changes) -> str:
    """A robot description written to ``tmp_path``: the shipped ``base`` one with ``changes``."""
    import yaml

    from vpp_edge.robot_description import ROBOTS_DIR

    data = {**yaml.safe_load((ROBOTS_DIR / f"{base}.yaml").read_text()), **changes}
    path = tmp_path / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_a_new_robot_on_a_shipped_driver_is_its_description_alone(tmp_path):
    """The description names its driver kind: a second Panda cell (another address) and a sim
    variant (another rate) need no registration, each gets its own settings."""
    from vpp_edge.firmware_bridge.config import load_bridge_config
    from vpp_edge.firmware_bridge.driver import KinematicSimDriver
    from vpp_edge.firmware_bridge.factory import DRIVERS, make_driver
    from vpp_edge.firmware_bridge.franka import FrankaDriver
    from vpp_edge.runtime.robot_config import load_robot_config

    assert DRIVERS.names() == ["sim", "metaworld", "xarm_xhand", "franka"]
    assert isinstance(make_driver(load_bridge_config("sim")), KinematicSimDriver)
    panda = load_bridge_config("panda")
    cell = _description(tmp_path, "panda", name="panda_cell2", driver={"kind": "franka", **panda.driver,
                                                                       "robot_ip": "172.16.1.2"})
    cfg = load_bridge_config(cell)
    assert (cfg.name, cfg.driver_kind, cfg.driver["robot_ip"]) == ("panda_cell2", "franka", "172.16.1.2")
    driver = make_driver(cfg)  # built, not connected: no robot needed
    assert isinstance(driver, FrankaDriver) and driver.host == "172.16.1.2"
    assert load_robot_config(cell).name == "panda_cell2"
    fast = load_bridge_config(_description(tmp_path, "sim", name="sim_fast", control_hz=50))
    assert fast.driver_kind == "sim" and isinstance(make_driver(fast), KinematicSimDriver)


def test_a_new_driver_kind_is_one_builder_and_its_registration(tmp_path):
    from vpp_edge.firmware_bridge.config import load_bridge_config
    from vpp_edge.firmware_bridge.driver import KinematicSimDriver
    from vpp_edge.firmware_bridge.factory import DRIVERS, make_driver

    class TwinSim(KinematicSimDriver):
        """A kind of its own (here: the sim, started where the description says)."""

    @DRIVERS.register("twin_sim")
    def twin(cfg):
        return TwinSim(cfg.dim, cfg.driver["start"])

    try:
        start = [0.1, 0, 0.2, 0, 0, 0, 1.0]
        cfg = load_bridge_config(_description(tmp_path, "sim", name="twin", driver={"kind": "twin_sim",
                                                                                      "start": start}))
        driver = make_driver(cfg)
        assert isinstance(driver, TwinSim) and driver.connect().tolist() == start
    finally:
        DRIVERS.unregister("twin_sim")


def test_a_description_must_name_a_known_driver_kind(tmp_path):
    """One line naming the closest kind and all of them; a description without a kind is
    refused by both sides (no silent default: the kind is what moves the robot)."""
    from vpp_edge.firmware_bridge.config import load_bridge_config
    from vpp_edge.runtime.robot_config import load_robot_config

    typo = _description(tmp_path, "panda", name="panda_typo", driver={"kind": "frankaa"})
    with pytest.raises(ConfigError, match=r"panda_typo.yaml: driver.kind: unknown robot driver 'frankaa' "
                                          r"\(did you mean 'franka'\?\); allowed: sim, metaworld, xarm_xhand, franka$"):
        load_bridge_config(typo)
    kindless = _description(tmp_path, "sim", name="kindless", driver={"robot_ip": "10.0.0.2"})
    for load in (load_bridge_config, load_robot_config):
        with pytest.raises(ConfigError, match=r"kindless.yaml: 'driver' must be a mapping naming its kind"):
            load(kindless)


def _artifact(engines=None, cpu_default=None, shipped=None):
    """A stand-in artifact; ``shipped``: its precisions (default fp32 and the cpu_default's)."""
    manifest = {"engines": engines or {}}
    if cpu_default is not None:
        manifest["cpu_default"] = cpu_default
    held = shipped if shipped is not None else ["fp32", *([cpu_default["precision"]] if cpu_default else [])]
    return SimpleNamespace(manifest=manifest, precisions=lambda: list(held))


def test_backend_auto_honours_the_artifacts_cpu_default():
    """TensorRT with engines built here; else the manifest's cpu_default (measured at export)
    when installed and no other precision is asked for; else ONNX Runtime. One line says why."""
    from vpp_edge.runtime.engines import choose_backend

    cpu = {"backend": "openvino", "precision": "int8_ov", "median_ms": {"openvino/int8_ov": 12.5}, "measured_on": "x86_64"}
    cpu_only = ["onnxruntime", "openvino"]
    backend, precision, why = choose_backend(_artifact(cpu_default=cpu), None, cpu_only)
    assert (backend, precision) == ("openvino", "int8_ov")
    assert why == ("TensorRT not installed; the artifact's cpu_default (fastest CPU engine measured at export on "
                   "x86_64, 12.5 ms)")
    assert choose_backend(_artifact({"fp16": {}}, cpu), None, ["tensorrt", *cpu_only])[:2] == ("tensorrt", None)
    backend, precision, why = choose_backend(_artifact({}, cpu), None, ["tensorrt", *cpu_only])
    assert (backend, precision) == ("openvino", "int8_ov") and why.startswith("no TensorRT engines in the artifact")
    backend, precision, why = choose_backend(_artifact(cpu_default=cpu), "fp32", cpu_only)
    assert (backend, precision) == ("onnxruntime", "fp32") and "fp32 asked for" in why
    backend, _, why = choose_backend(_artifact(cpu_default=cpu), None, ["onnxruntime"])
    assert backend == "onnxruntime" and "openvino/int8_ov is not installed here" in why
    # A deploy bundle that left the cpu_default's graphs home: ONNX Runtime, and why.
    backend, precision, why = choose_backend(_artifact(cpu_default=cpu, shipped=["fp32"]), None, cpu_only)
    assert (backend, precision) == ("onnxruntime", None) and "openvino/int8_ov has no graphs here" in why
    assert choose_backend(_artifact(), None, cpu_only) == ("onnxruntime", None, "TensorRT not installed: ONNX Runtime")


def test_create_engine_builds_the_registered_backend(monkeypatch):
    from vpp_edge.runtime import engines

    made = []

    @engines.ENGINES.register("fake", requires="numpy", default_precision="fp32", cpu=True)
    def fake(artifact, precision, threads=0, **options):
        made.append((precision, threads, options))
        return SimpleNamespace(backend="fake", precision=precision)

    try:
        monkeypatch.setattr(engines, "available_backends", lambda: ["onnxruntime", "fake"])
        engine = engines.create_engine(_artifact(), "fake", threads=2, hint="x")
        assert made == [("fp32", 2, {"hint": "x"})] and engine.choice is None
        cpu = {"backend": "fake", "precision": "int8_x"}
        engine = engines.create_engine(_artifact(cpu_default=cpu), "auto")
        assert engine.precision == "int8_x" and engine.choice.startswith("backend auto: fake/int8_x (")
    finally:
        engines.ENGINES.unregister("fake")
    with pytest.raises(ValueError, match="backend 'fake' unknown"):
        engines.create_engine(_artifact(), "fake")

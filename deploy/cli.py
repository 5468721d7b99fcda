"""Arguments and entry of ``vpp deploy`` (registered in vpp_edge/cli.py). Kept light:
argparse only at import, so ``vpp --help`` stays fast."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", required=True, help="user@host of the robot computer (make deploy-jetson JETSON=...)")
    p.add_argument("--artifact", type=Path, default=Path("artifacts/tiny"),
                   help="export artifact to deploy (default artifacts/tiny)")
    p.add_argument("--runtime-config", type=Path, help="runtime config YAML (recommended.yaml from 'vpp calibrate'): "
                   "its artifact, backend, precision and threads replace --artifact and the runtime settings")
    from vpp_edge.cli import LazyChoices

    p.add_argument("--robot", choices=LazyChoices("vpp_edge.robot_description", lambda m: m.known_robots()),
                   metavar="ROBOT", help="robot of the runtime and bridge units, a shipped description: %(choices)s "
                   "(default: the deploy config's, sim)")
    p.add_argument("--install-root", help="folder on the target (default /opt/vpp-edge)")
    p.add_argument("--profile", help="target: jetson-orin-jp6 (JetPack 6.2) | jetson-orin-jp7 (JetPack 7) | linux | "
                   "a YAML (default jetson-orin = jetson-orin-jp6)")
    p.add_argument("--online", action="store_true", default=None,
                   help="the target installs its packages from the package index (default on Jetson profiles: "
                   "from the bundle's wheelhouse, with no network)")
    p.add_argument("--allow-cpu-fallback", action="store_true", default=None,
                   help="deploy to a Jetson profile without TensorRT: the runtime runs ONNX Runtime on the CPU")
    p.add_argument("--python", help="Python on the target to run vpp-edge with, as it is (default: a venv at "
                   "INSTALL_ROOT/venv with the bundle's requirements-robot.txt)")
    p.add_argument("--venv-python", help="Python on the target that creates that venv with --system-site-packages "
                   "and runs the deploy agent (default: the profile's system_python, JetPack 6.2: /usr/bin/python3.10)")
    p.add_argument("--service-manager", help="systemctl-compatible command on the target (default systemctl; "
                   "without systemd: 'PY -m vpp_edge.deploy.supervisor --unit-dir D --state-dir S')")
    p.add_argument("--unit-dir", help="where the units go on the target (default /etc/systemd/system)")
    p.add_argument("--ssh-option", action="append", default=[], metavar="OPTION",
                   help="ssh/rsync option, as ssh -o OPTION (repeatable): Port=2222, IdentityFile=~/.ssh/robot, ... "
                   "(default: none; yours win over the built-in ConnectTimeout)")
    p.add_argument("--config", type=Path, help="YAML overriding vpp_edge/deploy/defaults.yaml")
    p.add_argument("--no-bridge", action="store_true", help="do not run the bridge on this computer")
    p.add_argument("--bundle-dir", type=Path, default=Path("build/deploy"),
                   help="where bundles are written locally (default build/deploy)")
    p.add_argument("--force", action="store_true", help="redeploy even if the target runs this bundle")
    p.add_argument("--dry-run", action="store_true", help="print every step and command; run nothing")


def run(args: argparse.Namespace) -> int:
    from vpp_edge.firmware_bridge.config import load_bridge_config
    from vpp_edge.runtime.robot_config import load_robot_config

    from .config import load_config
    from .deployer import Deployment

    runtime = None
    if args.runtime_config:  # what 'vpp calibrate' recommends for this robot computer
        from vpp_edge.calibrate.runtime_config import load_runtime_config

        recommended = load_runtime_config(args.runtime_config)
        args.artifact = recommended.artifact
        runtime = {"backend": recommended.backend, "precision": recommended.precision, "threads": recommended.threads}
    cfg = load_config(args.config, install_root=args.install_root, profile=args.profile, python=args.python,
                      venv_python=args.venv_python, online=args.online, allow_cpu_fallback=args.allow_cpu_fallback,
                      service_manager=args.service_manager, unit_dir=args.unit_dir, robot=args.robot,
                      bridge=False if args.no_bridge else None, runtime=runtime)
    load_robot_config(cfg["robot"])  # a typo fails here, not as a crash-looping unit on the robot
    if cfg["bridge"]:
        load_bridge_config(cfg["robot"])
    deployment = Deployment(cfg, args.artifact, args.target, args.ssh_option, args.bundle_dir,
                            out=lambda line: print(line, flush=True))
    return deployment.run(dry_run=args.dry_run, force=args.force)

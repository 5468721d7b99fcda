"""The Franka driver's gripper thread, against a fake at franky's ``Gripper`` boundary (the
calls block like the real ones); the real gripper runs in tests/test_franka_sim.py."""

import time

from vpp_edge.firmware_bridge.franka import GripperWorker

from .test_bridge import wait_until


class FakeGripper:
    max_width = 0.08

    def __init__(self, succeed: bool = True, seconds: float = 0.0):
        self.succeed, self.seconds = succeed, seconds
        self.calls: list[tuple] = []

    def move(self, width, speed):
        self.calls.append(("move", round(width, 4)))
        time.sleep(self.seconds)
        return self.succeed

    def grasp(self, width, speed, force, epsilon_inner, epsilon_outer):
        self.calls.append(("grasp", width))
        time.sleep(self.seconds)
        return self.succeed


def test_large_closures_grasp_small_ones_move_to_the_width():
    gripper = FakeGripper()
    worker = GripperWorker(gripper, speed=0.05, force=20.0, grasp_above=0.9)
    worker.command(0.25)
    assert wait_until(lambda: len(gripper.calls) == 1)
    worker.command(0.95)
    assert wait_until(lambda: len(gripper.calls) == 2)
    worker.close()
    assert gripper.calls == [("move", 0.06), ("grasp", 0.0)] and not worker.errors


def test_the_newest_closure_wins_while_a_command_blocks():
    gripper = FakeGripper(seconds=0.3)
    worker = GripperWorker(gripper, speed=0.05, force=20.0, grasp_above=0.9)
    worker.command(0.0)
    assert wait_until(lambda: len(gripper.calls) == 1)
    for closure in (0.2, 0.4, 0.5):  # arrive while the first move blocks
        worker.command(closure)
    assert wait_until(lambda: len(gripper.calls) == 2)
    time.sleep(0.4)
    worker.close()
    assert gripper.calls == [("move", 0.08), ("move", 0.04)], "intermediate closures are dropped"


def test_a_command_that_reports_failure_is_an_error_not_silence():
    gripper = FakeGripper(succeed=False)
    worker = GripperWorker(gripper, speed=0.05, force=20.0, grasp_above=0.9)
    worker.command(1.0)
    assert wait_until(lambda: worker.errors)
    worker.close()
    assert "closure 1.00 did not complete" in worker.errors[0]

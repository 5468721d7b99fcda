"""Fake ``xarm.wrapper.XArmAPI``: records calls, tracks a pose, injects error codes."""

INSTANCES = []


class XArmAPI:
    def __init__(self, ip, is_radian=False):
        self.ip, self.is_radian = ip, is_radian
        self.calls = []
        self.pose = [400.0, 0.0, 300.0, 3.14, 0.0, 0.0]  # mm, rad
        self.angles = [0.0] * 7
        self.error_code = 0
        self.warn_code = 0
        self.state = 4
        self.mode = 0
        self.fail = {}  # method name -> return code to fail with
        INSTANCES.append(self)

    def _call(self, name, *args):
        self.calls.append((name, args))
        return self.fail.get(name, 0)

    def clean_error(self):
        return self._call("clean_error")

    def clean_warn(self):
        return self._call("clean_warn")

    def motion_enable(self, enable=True):
        return self._call("motion_enable", enable)

    def set_mode(self, mode):
        code = self._call("set_mode", mode)
        self.mode = mode if code == 0 else self.mode
        return code

    def set_state(self, state):
        code = self._call("set_state", state)
        self.state = state if code == 0 else self.state
        return code

    def set_servo_cartesian(self, mvpose, speed=None, mvacc=None, mvtime=0, is_radian=None):
        code = self._call("set_servo_cartesian", tuple(mvpose))
        if code == 0 and self.state == 0 and self.mode == 1:
            self.pose = list(mvpose)
        return code

    def get_position(self, is_radian=None):
        self.calls.append(("get_position", ()))
        return 0, list(self.pose)

    def get_servo_angle(self, is_radian=None):
        return 0, list(self.angles)

    def emergency_stop(self):
        self.state = 4
        return self._call("emergency_stop")

    def disconnect(self):
        self._call("disconnect")

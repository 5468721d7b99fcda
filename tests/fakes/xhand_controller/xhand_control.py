"""Fake ``xhand_controller.xhand_control``: XHandControl, HandCommand_t, error structs."""

INSTANCES = []


class ErrorStruct:
    def __init__(self, code=0, message=""):
        self.error_code, self.error_message = code, message


class _Finger:
    def __init__(self):
        self.id = self.kp = self.ki = self.kd = self.tor_max = self.mode = 0
        self.position = 0.0


class HandCommand_t:  # noqa: N801 - the SDK's name
    def __init__(self):
        self.finger_command = [_Finger() for _ in range(12)]


class _State:
    def __init__(self, positions):
        self.finger_state = [type("FingerState", (), {"position": p})() for p in positions]


class XHandControl:
    def __init__(self):
        self.opened = None
        self.sent = []  # (hand_id, [(id, kp, tor_max, mode, position) x 12])
        self.positions = [0.0] * 12
        self.open_error = ErrorStruct()
        INSTANCES.append(self)

    def open_serial(self, port, baudrate):
        self.opened = (port, baudrate)
        return self.open_error

    def send_command(self, hand_id, command):
        fingers = [(f.id, f.kp, f.tor_max, f.mode, f.position) for f in command.finger_command]
        self.sent.append((hand_id, fingers))
        self.positions = [f[4] for f in fingers]
        return ErrorStruct()

    def read_state(self, hand_id, force_update=False):
        return ErrorStruct(), _State(self.positions)

    def close_device(self):
        self.opened = None

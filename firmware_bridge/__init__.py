"""Bridge processes between the runtime's ZeroMQ messages and robot controllers
(Franka Panda via franky, xArm + XHand, a simulator). Imports no torch."""

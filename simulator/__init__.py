"""SimPy discrete-event simulation of the engine on request traces (installed as yaie.simulator)."""

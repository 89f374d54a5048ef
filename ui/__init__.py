"""Terminal chat and dashboard front ends (installed as yaie.ui)."""

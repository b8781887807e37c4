"""Example-level balancing (M4) and its multimodal wiring; feeds the mixing plan keep-masks."""

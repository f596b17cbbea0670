"""MoeBar engine: streams the routed experts of MoE models from the SSD (no Qt here)."""

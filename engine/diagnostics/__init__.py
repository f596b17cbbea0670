"""Tools that measure and check the engine: the benchmark and its report."""

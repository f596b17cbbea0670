"""The streamed model: loading, the streamed MoE layer, the expert cache, prefill, the generate loop, memory plan."""

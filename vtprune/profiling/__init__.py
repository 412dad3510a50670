"""``vtprune profile``: latency, memory and prefill FLOPs of pruned generation (``measure``, ``flops``, ``cli``)."""

"""Model-independent machinery: sequence compaction, the two stages, per-cache decode state."""

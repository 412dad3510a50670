"""vtprune in lmms-eval: the ``vtprune`` model (``lmms_model``, needs the ``eval`` extra) and the checks
of its ``--model_args`` (``options``, no lmms-eval needed)."""

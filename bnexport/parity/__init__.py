"""Parity: what each runtime is fed (``inputs``, ``sources``), how it is run and compared (``compare``)."""

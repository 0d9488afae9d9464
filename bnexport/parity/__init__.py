"""Parity: what each runtime is fed (``inputs``, ``sources``), how it is run (``runners``), how the
outputs are compared (``compare``), and where two models part when they disagree (``divergence``)."""

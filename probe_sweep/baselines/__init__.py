"""What each identity probe is read against, fitted in the pipeline after the identity probes
and handed to the statistics as values. Each baseline is a function of the inputs it is given
and returns its own typed part of the layer results (``results.py``):

- ``depth.py``: each layer's top-1 minus the previous layer's, paired.
- ``control.py``: the control task (Hewitt & Liang 2019), the same kind of probe on a fixed
  random label per type; selectivity.
- ``random_init.py``: the same probes on the same architecture with random weights.
- ``lens_probe.py``: the probe fed the logit lens's guess instead of the hidden state.
- ``lenses.py`` (with ``tuned_lens.py``): the logit lens and a tuned lens side by side.
- ``mdl.py``: the online code length (Voita & Titov 2020) of the token and of the control task.
- ``k_sweep.py``: accuracy against the number of basis directions the probe sees.
"""

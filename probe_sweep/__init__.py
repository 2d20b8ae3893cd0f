"""probe_sweep: linear probes that recover the input token from each layer of a transformer."""

__version__ = "0.1.0"

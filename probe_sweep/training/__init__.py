"""Models trained by the tool itself (before stage 1): a small decoder on an offline corpus."""

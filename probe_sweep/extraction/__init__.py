"""The first stages: the model, the corpus and its split, and the cached hidden states."""

"""Stage 5: the identity probes of a job, fitted on its inputs and scored on held-out tokens."""

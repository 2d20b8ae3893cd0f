"""Benchmark: ``python -m probe_sweep.bench [flags]`` prints one table, measured in one run on the
same data, and appends it (with the machine and the date) to BENCHMARKS.md.

1. activation extraction, tokens/s, against the forward-pass bound (``extraction.py``);
2. per-layer softmax probes against scikit-learn's ``LogisticRegression`` at a matched objective
   (``softmax.py``);
3. the ridge regularisation path against scikit-learn's ``RidgeCV`` (``ridge.py``);
4. a 3-basis sweep of real jobs against one job (``sweep.py``);
5. peak resident memory of a real job as the token budget doubles twice (``memory.py``);
6. two real jobs at once on the same cores against one after the other (``contention.py``);
7. scale: the real job at 100k and 1M tokens (5M where the disk allows): extraction and fit
   rates, peak RSS, cache bytes, and whether memory and cost per token stay flat (``scale.py``);
8. gpu_scale: the GPT-2-XL-shaped random-init job at 1M tokens on a GPU against the bare
   forward pass (``gpu_scale.py``; skipped without CUDA).

Sections 1-6 run by default; 7 and 8 take long and run when named (``--only scale``,
``--only gpu_scale``, ``--only all``). ``common.py`` holds what they share: timing, the machine,
the job's typed config, and real jobs run in a fresh process with their memory sampled.

Timings on a shared machine are noisy: each of our timings is the median of ``--repeats`` runs,
and every ratio compares numbers taken minutes apart in the same process.
"""

"""Linear probes: the estimators, their solvers, and the rows they are fitted on."""

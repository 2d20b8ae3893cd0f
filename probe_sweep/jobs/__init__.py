"""A job's directory, where a job runs, and a sweep's jobs as its directory holds them."""

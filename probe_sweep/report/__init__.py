"""What people look at: the job's plots and tables, and the sweep-level report."""

"""drover: jobs."""

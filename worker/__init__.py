"""drover: worker."""

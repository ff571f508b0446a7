"""drover: lab."""

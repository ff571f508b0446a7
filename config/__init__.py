"""drover: config."""

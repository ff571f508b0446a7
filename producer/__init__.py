"""drover: producer."""

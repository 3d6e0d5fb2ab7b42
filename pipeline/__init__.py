"""AKI training pipeline."""

"""Image operations: decode and normalize bytes, model-input geometry."""

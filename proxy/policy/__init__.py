"""Policy: the model of policy format v1, loading and validation."""

"""The guard: decides, for one statement, whether to forward it as is, rewritten, or refuse it."""

"""Sensitive-data discovery: detectors (pure functions), catalog sampling and the draft policy report."""

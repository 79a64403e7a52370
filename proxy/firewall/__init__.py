"""The query firewall: injection rules, fingerprint allow-lists, sensitive join keys, concentration risk."""

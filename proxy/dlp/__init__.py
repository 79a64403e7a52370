"""Data loss prevention in the relay: row budgets per role and login, honeytokens (docs/dlp.md)."""

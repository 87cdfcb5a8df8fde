"""Pipeline stages: each takes an artifact and options and returns a new artifact."""

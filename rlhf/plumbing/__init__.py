"""Plumbing shared by every service: server start-up, health, drain, config, TLS, errors, logging,
metrics. No domain logic lives here."""

"""Model router: canary and shadow deployments, health checks, release gate, rollback."""

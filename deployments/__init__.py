"""Ray Serve application builders, ingress, config schema, CLI, local engine processes."""

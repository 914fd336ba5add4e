"""Registry, run log, signing, blob publisher, rollout, device bundle: a version's way out."""

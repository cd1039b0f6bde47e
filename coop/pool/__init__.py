"""Who belongs to a pool: CA and certificates, member bundles, the registry, API keys, revocations."""

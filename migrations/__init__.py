"""Alembic environment of the store (shipped as ``influence_store.migrations``)."""

"""Persistence: SQLAlchemy 2.0 typed tables, the session factory and tenant-scoped repositories."""

"""RQ jobs: thin wrappers that load ids and call the billing service layer.

Each job builds its own app context (never `create_app()` at import time) and is
safe to run twice.
"""

"""Use cases shared by the gateway and the workers: no FastAPI, and torch only inside functions that need it."""

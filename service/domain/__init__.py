"""Use cases shared by the gateway and the workers: no FastAPI; torch only inside functions."""

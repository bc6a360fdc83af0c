"""The HTTP gateway (FastAPI only): parse, call the domain, shape the answer."""

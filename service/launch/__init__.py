"""What runs in each process of `actprompt serve`: the wiring of the domain and the database to serving.

``front``: the domain's `Predictor` in an HTTP front process (decode and preprocess images, then hand
tensors and internal keys to the engine); ``engine``: the engine process's main, with the database as
its prompt source; ``serve``: the parent that starts the engine, restarts it when it dies, and runs the
front processes.
"""

"""`python -m bench.accuracy`."""

from bench.accuracy.driver import main

main()

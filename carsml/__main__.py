"""`python -m carsml` (and `torchrun ... -m carsml`): the `carsml` command line."""

from carsml.cli import main

main()

"""`python -m fedvault` runs the command-line interface."""

from fedvault.cli import main

main()
